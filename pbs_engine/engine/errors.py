"""Errors a request can meet in the engine, typed so that the API layers map them once (HTTP 400, CLI message)."""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A request that cannot run as given: `param` names the request field at fault, `code` says why in one word
    (OpenAI's error codes: invalid_value, context_length_exceeded, ...)."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value", reason: str | None = None):
        super().__init__(message)
        self.param, self.code, self.message = param, code, message
        self.reason = reason  # the rule broken, without the field's name (a CLI says it in its flag's words)


class RequestFailed(RuntimeError):
    """The engine failed while running one request; the other requests of its step carried on."""
