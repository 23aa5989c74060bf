"""Progress of long waits (GGUF conversion, batch runs) on stderr: a tqdm bar on a terminal; in logs and pipes the
same meter as a plain line at the start, every LINE_INTERVAL_S seconds and at the end (no carriage returns)."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LINE_INTERVAL_S = 10.0
LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def progress(total: int, desc: str, unit: str = "it", postfix: str = ""):
    """A meter on stderr for `total` units of work, with tqdm's interface: n, total, update(n), set_postfix_str(s),
    close(), `with`."""
    file = sys.stderr
    if file.isatty():
        return tqdm(total=total, desc=desc, unit=unit, postfix=postfix, file=file, dynamic_ncols=True)
    return LineProgress(total, desc, unit, postfix, file)


class LineProgress:
    """tqdm's meter printed as whole lines, for output that is not a terminal."""

    def __init__(self, total: int, desc: str, unit: str, postfix: str, file: TextIO, interval: float = LINE_INTERVAL_S):
        self.total, self.desc, self.unit, self.postfix = total, desc, unit, postfix
        self.file, self.interval = file, interval
        self.n = 0
        self.start = self.last = time.monotonic()
        self._print()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._print()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        self._print()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _print(self) -> None:
        self.last = time.monotonic()
        line = tqdm.format_meter(self.n, self.total, self.last - self.start, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix, bar_format=LINE_FORMAT)
        self.file.write(line + "\n")
        self.file.flush()
