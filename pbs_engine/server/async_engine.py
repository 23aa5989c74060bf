"""The engine loop in a background thread, so HTTP handlers can submit requests and await their outputs.

One thread owns the LLMEngine: it takes add/abort commands from a thread-safe queue between steps, runs
`engine.step()` while anything is unfinished (batching every request in flight), and hands each output to the
asyncio queue of the HTTP request it belongs to. Everything but that thread only touches the routing tables below,
and only from the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Union

from pbs_engine.engine.llm_engine import LLMEngine
from pbs_engine.engine.outputs import RequestOutput
from pbs_engine.engine.sampling_params import SamplingParams
from pbs_engine.server.errors import APIError
from pbs_engine.server.metrics import Metrics

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running this request; the request is aborted, the server keeps serving."""


@dataclass
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class AbortRequest:
    request_id: str


class Shutdown:
    """Abort everything in flight and end the engine thread."""


Command = Union[AddRequest, AbortRequest, Shutdown]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: Metrics, max_queue: int):
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.stats: dict = engine.stats()  # refreshed by the engine thread after every step
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._live: set[str] = set()  # engine thread: requests added to the engine and not yet finished
        self._routes: dict[str, asyncio.Queue] = {}  # event loop: engine request id -> its HTTP request's queue
        self._waiting: set[str] = set()  # event loop: admitted requests that have not produced a token yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- event loop side ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pbs-engine-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._commands.put(Shutdown())
        self._thread.join(timeout=60)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request_id: str, prompts: list[tuple[list[int], SamplingParams]]
               ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Queue one engine request per prompt; iterate the result for (prompt index, output) as they come."""
        if not self.alive:
            raise APIError(503, "the engine loop is not running", code="engine_dead")
        if self.num_waiting + len(prompts) > self.max_queue:
            self.metrics.rejected.inc()
            raise APIError(503, f"the server is busy: {self.num_waiting} requests are already waiting "
                                f"(--max-queue {self.max_queue}); retry later", code="queue_full")
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        outputs: asyncio.Queue = asyncio.Queue()
        for rid, (prompt_ids, params) in zip(ids, prompts):
            self._routes[rid] = outputs
            self._waiting.add(rid)
            self._commands.put(AddRequest(rid, prompt_ids, params))
        return self._outputs(ids, outputs)

    async def _outputs(self, ids: list[str], outputs: asyncio.Queue) -> AsyncIterator[tuple[int, RequestOutput]]:
        index = {rid: i for i, rid in enumerate(ids)}
        pending = set(ids)
        try:
            while pending:
                item = await outputs.get()
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    pending.discard(item.request_id)
                yield index[item.request_id], item
        finally:  # the client went away, or one of the samples failed: free the others' cache at once
            for rid in pending:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._routes.pop(request_id, None)
        self._waiting.discard(request_id)
        self._commands.put(AbortRequest(request_id))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._waiting.discard(out.request_id)
            route = self._routes.pop(out.request_id, None) if out.finished else self._routes.get(out.request_id)
            if route is not None:
                error = out.error is not None
                route.put_nowait(EngineError(f"the engine failed while running this request: {out.error}")
                                 if error else out)

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        for rid in request_ids:
            self._waiting.discard(rid)
            route = self._routes.pop(rid, None)
            if route is not None:
                route.put_nowait(error)

    # ---- engine thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            commands = [] if self.engine.has_unfinished() else [self._commands.get()]
            while not self._commands.empty():
                commands.append(self._commands.get())
            for command in commands:
                if isinstance(command, Shutdown):
                    self._abort_all(EngineError("the server is shutting down"))
                    return
                self._apply(command)
            self.stats = self.engine.stats()
            if self.engine.has_unfinished():
                self._step()

    def _apply(self, command: Command) -> None:
        if isinstance(command, AbortRequest):
            if command.request_id in self._live:
                self._live.discard(command.request_id)
                self.metrics.record(self.engine.abort(command.request_id))
            return
        try:
            self.engine.add_request(command.prompt_ids, command.params, request_id=command.request_id)
            self._live.add(command.request_id)
        except Exception as e:  # validated in the HTTP layer already: anything here is the engine's fault
            logger.exception("engine rejected request %s", command.request_id)
            self._loop.call_soon_threadsafe(self._fail, [command.request_id],
                                            EngineError(f"the engine rejected the request: {e}"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing %d requests", len(self._live))
            self._abort_all(EngineError(f"the engine failed while running this request: {e}"))
            return
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
                if out.error is not None:
                    self.metrics.failed.inc()
                else:
                    self.metrics.record(out)
        self.stats = self.engine.stats()  # before delivering: a client that saw an output sees the cache it used
        self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _abort_all(self, error: Exception) -> None:
        failed = sorted(self._live)
        for rid in failed:
            try:
                self.engine.abort(rid)
            except Exception:
                logger.exception("could not abort request %s", rid)
        self._live.difference_update(failed)
        self.metrics.failed.inc(len(failed))
        self.stats = self.engine.stats()
        self._loop.call_soon_threadsafe(self._fail, failed, error)
