"""`pbs-engine serve` as a subprocess on a free local port, for harnesses that talk HTTP, and the prefill density
its /metrics reports."""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 1800.0  # a first run may convert or download the model
STOP_TIMEOUT_S = 60.0


def model_flags(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The model options set in `args` (those `add_model_args` defines, except `skip` dests) as command-line flags."""
    from pbs_engine.cli.common import add_model_args

    parser = argparse.ArgumentParser(add_help=False)
    add_model_args(parser)
    flags: list[str] = []
    for action in parser._actions:  # argparse keeps no public list of a parser's options
        value = getattr(args, action.dest, action.default)
        if action.dest in skip or value == action.default or not action.option_strings:
            continue
        long = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            flags.append(long if value else "--no-" + long[2:])
        elif action.nargs == 0:  # store_true and the like
            flags.append(long)
        else:
            flags += [long, str(value)]
    return flags


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServedModel:
    """`pbs-engine serve FLAGS` on 127.0.0.1 while the `with` block runs; its output goes to `log_path`."""

    def __init__(self, flags: list[str], log_path: Path, host: str = "127.0.0.1"):
        self.flags, self.log_path, self.host = flags, Path(log_path), host
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServedModel":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pbs_engine.cli.main", "serve", *self.flags, "--host", self.host,
               "--port", str(self.port)]
        with open(self.log_path, "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = "\n".join(self.log_path.read_text().splitlines()[-5:])
                raise OSError(f"pbs-engine serve {' '.join(self.flags)} exited ({self.process.returncode}) before "
                              f"it was ready; {self.log_path}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise OSError(f"pbs-engine serve was not ready after {STARTUP_TIMEOUT_S:.0f}s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def density_totals(self) -> tuple[float, int]:
        """(sum, count) of the pbs_prefill_density histogram: the density of every request prefilled so far."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        samples = {s.name: s.value for family in text_string_to_metric_families(text)
                   if family.name == "pbs_prefill_density" for s in family.samples}
        return samples["pbs_prefill_density_sum"], int(samples["pbs_prefill_density_count"])
