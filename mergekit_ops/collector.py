"""Pausing Python's garbage collector around work that makes many objects but no cycles."""
from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def paused():
    """No collections inside; the collector's previous state after. Used around the torch import
    (a great many objects; counted in docs/benchmarks.md) and the merge loop, whose many small
    objects otherwise trigger full collections over everything torch imported."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
