"""The device names a merge runs on, checked without importing torch: the pipeline checks every
recipe's `device:` on each `dvc repro`, the engine checks its option with the same rule."""
from __future__ import annotations

import re

DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?")


def is_device_name(name: object) -> bool:
    """cpu, cuda or cuda:N. Whether torch sees that device is checked when a merge starts."""
    return isinstance(name, str) and DEVICE_NAME.fullmatch(name) is not None
