"""Progress of long loops: a bar on a terminal, plain lines in a log file.

`quiet_library_progress` silences the bars transformers and the HF hub draw while loading weights:
a stage reports its own progress.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta

log = logging.getLogger("mner.runtime")  # one logger for the package, as its users name it

# Seconds between two progress lines when stderr is not a terminal (a log file, a batch job's output).
PROGRESS_INTERVAL_S = 10.0


class ProgressLog:
    """Progress of a loop of `total` steps, for a person at a terminal or a log file read later.

    On a terminal (stderr is a tty) a tqdm bar, redrawn in place. Otherwise plain lines through logging
    (`desc: done/total unit (pct%), rate unit/s, ETA h:mm:ss[, postfix]`), never a `\r`: one every
    `interval` seconds (default PROGRESS_INTERVAL_S) and, with `every`, one each `every` steps; and one
    at the end. `enabled=False` (ranks other than 0) shows nothing. Use as a context manager.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        enabled: bool = True,
        interval: float | None = None,
        every: int | None = None,
        stream=None,
    ):
        from tqdm import tqdm

        stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.enabled = enabled
        self.terminal = enabled and stream.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not self.terminal)
        self.done, self.postfix, self.closed = 0, {}, False
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        before, self.done = self.done, self.done + n
        if not self.enabled or self.terminal:
            return
        now = time.monotonic()
        step_due = bool(self.every) and before // self.every != self.done // self.every
        if step_due or now - self.last >= self.interval:
            self.last = now
            log.info(self.line(now))

    def set_postfix(self, **values) -> None:
        """Values shown after the counts (e.g. loss=0.1234), on the bar and in the following lines."""
        self.postfix = values
        self.bar.set_postfix(values, refresh=False)

    def line(self, now: float | None = None) -> str:
        """The plain progress line for the current count."""
        elapsed = max((time.monotonic() if now is None else now) - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else str(timedelta(seconds=round(left)))
        percent = 100.0 * self.done / self.total if self.total else 100.0
        text = (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
            f"{rate:.1f} {self.unit}/s, ETA {eta}"
        )
        extra = ", ".join(f"{name}={value}" for name, value in self.postfix.items())
        return f"{text}, {extra}" if extra else text

    def close(self) -> None:
        self.bar.close()
        if self.enabled and not self.terminal and not self.closed:
            log.info(self.line())
        self.closed = True

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_library_progress() -> None:
    """Silence the progress bars transformers ("Loading weights") and huggingface_hub draw: a stage
    reports its own progress, and those bars fill a log file with `\r` lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency of both stages
        return
    hf_logging.disable_progress_bar()
