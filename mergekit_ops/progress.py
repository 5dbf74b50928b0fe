"""A progress bar on stderr: tensors done, output bytes per second (tqdm when installed)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class ProgressBar:
    """Callable as MergeOptions.progress(done, total, bytes_written); one bar per document."""

    def __init__(self):
        self._bar = None
        self._start = time.monotonic()

    def __call__(self, done: int, total: int, written: int) -> None:
        if self._bar is None or done == 1:
            self.close()
            self._start = time.monotonic()
            self._bar = _make_bar(total)
        rate = written / max(time.monotonic() - self._start, 1e-6)
        self._bar.update(done, f"{rate / 1e6:,.0f} MB/s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def progress_bar(show: bool) -> Iterator[ProgressBar | None]:
    """A ProgressBar when `show` (else None), closed however the work ends."""
    bar = ProgressBar() if show else None
    try:
        yield bar
    finally:
        if bar:
            bar.close()


def _make_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(total)
    return _TqdmBar(tqdm(total=total, unit="tensor", file=sys.stderr, dynamic_ncols=True))


class _TqdmBar:
    def __init__(self, bar):
        self.bar = bar

    def update(self, done: int, postfix: str) -> None:
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()


class _PlainBar:
    def __init__(self, total: int):
        self.total, self.last = total, 0.0

    def update(self, done: int, postfix: str) -> None:
        now = time.monotonic()
        if done == self.total or now - self.last > 2:
            self.last = now
            print(f"merged {done}/{self.total} tensors, {postfix}", file=sys.stderr)

    def close(self) -> None:
        pass
