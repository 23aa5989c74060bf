"""Every failure leaves the server as an OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pbs_engine.engine.errors import InvalidRequest

logger = logging.getLogger(__name__)

UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")  # pydantic's loc names union members by type


class APIError(Exception):
    """A request that cannot be served; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def invalid(cls, e: InvalidRequest) -> "APIError":
        return cls(400, e.message, param=e.param, code=e.code)

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    # in a union, every branch reports; a value check that ran (a lone surrogate, ...) says more than a type miss
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not UNION_BRANCH.match(str(p))]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = ".".join(loc) or None
    where = f"{param}: " if param else "request body: "
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return APIError(400, where + message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(InvalidRequest)
    async def invalid_value(_: Request, exc: InvalidRequest) -> JSONResponse:
        return APIError.invalid(exc).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, APIError):  # raised while FastAPI read the body (the body cap's 413)
            return exc.__cause__.response()
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()  # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
