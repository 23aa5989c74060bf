"""The other tensor-parallel ranks: one process each, started by the engine (no torchrun), joined to rank 0 by a
torch.distributed process group (NCCL on CUDA, gloo on CPU). Rank 0 hands every step's StepInput to each worker
through a pipe; the workers run the model in lockstep with it and report a failure before they exit, so the
engine stops with the worker's error instead of waiting on it."""
from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import socket
import traceback

import torch

from pbs_engine.engine.config import EngineConfig
from pbs_engine.models.layers.parallel import TensorParallel

logger = logging.getLogger(__name__)
TIMEOUT = datetime.timedelta(minutes=30)  # one collective: a 1M-token prefill step stays well inside


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed; the engine cannot run any more steps."""


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    if torch.device(config.device).type == "cuda":
        return torch.device("cuda", rank)
    return torch.device("cpu")


def process_group(config: EngineConfig, rank: int, port: int) -> TensorParallel:
    """Join the group of `config.tensor_parallel_size` ranks at 127.0.0.1:port (rank 0 hosts the store)."""
    import torch.distributed as dist

    size = config.tensor_parallel_size
    store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=TIMEOUT)
    if torch.device(config.device).type == "cuda":
        torch.cuda.set_device(rank)
        group = dist.ProcessGroupNCCL(store, rank, size)
    else:
        group = dist.ProcessGroupGloo(store, rank, size, TIMEOUT)
    return TensorParallel(rank, size, group)


def _worker_main(config: EngineConfig, model_dir: str, rank: int, port: int, max_len_from_model: bool,
                 inbox, outbox) -> None:
    from pbs_engine.engine.model_runner import ModelRunner

    try:
        if torch.device(config.device).type == "cpu":  # share the cores between the ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
        tp = process_group(config, rank, port)
        runner = ModelRunner(config, model_dir, max_len_from_model, tp, rank_device(config, rank))
        outbox.send(("ready", rank))
        while True:
            step = inbox.recv()
            if step is None:
                return
            for _ in runner.execute(step):
                pass
    except BaseException:  # tell rank 0 why, then leave
        outbox.send(("error", f"tensor-parallel worker {rank} failed:\n{traceback.format_exc()}"))
        raise SystemExit(1)


class Workers:
    """Ranks 1..N-1. `start` spawns them; `send` hands one StepInput to each; `check` raises WorkerError when one
    has failed or died."""

    def __init__(self, config: EngineConfig, model_dir: str, max_len_from_model: bool):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for rank in range(1, config.tensor_parallel_size):
            inbox_here, inbox_there = ctx.Pipe()
            outbox_here, outbox_there = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, name=f"pbs-engine-tp{rank}", daemon=True,
                               args=(config, model_dir, rank, self.port, max_len_from_model, inbox_there,
                                     outbox_there))
            proc.start()
            self.pipes.append((inbox_here, outbox_here))
            self.procs.append(proc)
        self.error: str | None = None

    def wait_ready(self) -> None:
        """After rank 0 has built its runner (which needs every rank in its collectives): all ranks are up."""
        for rank, (_, outbox) in enumerate(self.pipes, start=1):
            kind, value = outbox.recv() if self._alive(rank) else ("error", f"worker {rank} exited")
            if kind == "error":
                self.error = value
                self.check()

    def _alive(self, rank: int) -> bool:
        proc = self.procs[rank - 1]
        proc.join(timeout=0)
        return proc.is_alive() or self.pipes[rank - 1][1].poll()

    def check(self, wait: float = 0.0) -> None:
        """Raise WorkerError if a worker reported a failure or died; `wait`: give a dying one that long to go."""
        for proc in self.procs if wait else []:
            proc.join(timeout=wait / len(self.procs))
        if self.error is None:
            for rank, (proc, (_, outbox)) in enumerate(zip(self.procs, self.pipes), start=1):
                message = self._message(outbox)
                if message is not None and message[0] == "error":
                    self.error = message[1]
                elif not proc.is_alive():
                    proc.join(timeout=1)
                    self.error = f"tensor-parallel worker {rank} died (exit code {proc.exitcode})"
                if self.error:
                    break
        if self.error is not None:
            raise WorkerError(self.error)

    @staticmethod
    def _message(outbox) -> tuple[str, str] | None:
        try:
            return outbox.recv() if outbox.poll() else None
        except (EOFError, OSError):  # the worker is gone without a word (killed)
            return None

    def send(self, step) -> None:
        self.check()
        for inbox, _ in self.pipes:
            try:
                inbox.send(step)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                self.check()
                raise WorkerError("a tensor-parallel worker went away") from None

    def stop(self) -> None:
        for inbox, _ in self.pipes:
            try:
                inbox.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
