"""The NaN/Inf check of merged tensors agrees with torch.isfinite on every dtype and position."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mergekit_ops.chunks import CHUNK
from mergekit_ops.finite import all_finite, part_is_finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_finite_check_agrees_with_isfinite(dtype, seed):
    for _ in range(20):
        n = int(torch.randint(1, 5000, ()))
        x = (torch.randn(n) * 10.0 ** float(torch.randint(-3, 4, ()))).to(dtype)
        for _ in range(int(torch.randint(0, 3, ()))):  # none, one or two bad entries anywhere
            x[int(torch.randint(0, n, ()))] = [float("nan"), float("inf"), float("-inf")][int(torch.randint(0, 3, ()))]
        assert part_is_finite(x) == bool(torch.isfinite(x).all())


def test_whole_tensor_check_finds_a_bad_entry_in_any_chunk(seed):
    x = torch.randn(2 * CHUNK + int(torch.randint(1, 1000, ()))).bfloat16()
    with ThreadPoolExecutor(2) as pool:
        assert all_finite(x, pool) and all_finite(x)
        x[int(torch.randint(0, x.numel(), ()))] = float("nan")
        assert not all_finite(x, pool) and not all_finite(x)
    assert part_is_finite(torch.empty(0)) and part_is_finite(torch.arange(5))
