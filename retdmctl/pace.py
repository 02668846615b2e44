"""A long pass over images (a backbone cache's extraction): its progress bar, and once a
short warm-up is measured, one line with the rate and the time left."""

from __future__ import annotations

import time
from collections.abc import Callable

from retdmctl.progress import make_progress


def duration(seconds: float) -> str:
    """``seconds`` rounded for an estimate: 40 s, 12 min, 3.2 h."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class Pace:
    """``with Pace("backbone features", total, say) as pace: ... pace.advance(n)``.

    The first batch is not measured (it pays for memory allocation, oneDNN's kernel
    choice, the first reads from a cold disk); the rate is measured from the end of the
    first batch until ``warmup`` images (at most 256, at least two batches) or 30 s have
    passed, and ``say`` receives ``about 12 min left (27 images/s measured on 256 images)``.
    With ``processes`` > 1 each process runs its own ``total`` at once: the line gives the
    rate of all of them."""

    def __init__(self, description: str, total: int, say: Callable[[str], None] | None = None, *,
                 processes: int = 1, clock: Callable[[], float] = time.perf_counter) -> None:
        self.description, self.total, self.say, self.processes, self.clock = description, total, say, processes, clock
        self.warmup = min(256, max(32, total // 10))
        self.done = self.batches = 0
        self.start: tuple[float, int] | None = None  # (time, images done) at the end of the first batch
        self.told = say is None

    def __enter__(self) -> Pace:
        self.progress = make_progress()
        self.progress.__enter__()
        self.task = self.progress.add_task(self.description, total=self.total, info="")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)
        self.done += n
        self.batches += 1
        now = self.clock()
        if self.start is None:
            self.start = (now, self.done)
            return
        if self.told:
            return
        seconds, images = now - self.start[0], self.done - self.start[1]
        if (images >= self.warmup and self.batches >= 3) or seconds >= 30:
            self.told = True
            rate = images / max(seconds, 1e-9)
            if self.done < self.total:  # nothing to estimate once it is done
                self.say(self._line(rate, images))  # type: ignore[misc]

    def _line(self, rate: float, images: int) -> str:
        left = duration((self.total - self.done) / rate)
        if self.processes == 1:
            return f"about {left} left ({_rate(rate)} images/s measured on {images} images)"
        return (f"about {left} left ({_rate(rate * self.processes)} images/s in {self.processes} processes, "
                f"measured on {images} images of rank 0)")


def _rate(per_second: float) -> str:
    return f"{per_second:.0f}" if per_second >= 10 else f"{per_second:.2g}"
