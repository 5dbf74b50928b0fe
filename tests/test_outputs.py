"""Recycled output buffers: what comes back is lent again, nothing else is, and the cap holds."""
import torch

from mergekit_ops import outputs
from mergekit_ops.outputs import OutputBuffers
from mergekit_ops.safetensors_io import BLOCK

CPU = torch.device("cpu")


def _size(lo=1000, hi=100_000) -> int:
    return int(torch.randint(lo, hi, ()))


def test_a_buffer_given_back_is_lent_again_for_its_size(seed):
    pool = OutputBuffers()
    n = _size()
    first = pool.take(n, torch.bfloat16, CPU)
    ptr = first.data_ptr()
    pool.give(first.view(n, 1))  # a view of the buffer counts as the buffer
    del first
    again = pool.take(n, torch.bfloat16, CPU)
    assert again.data_ptr() == ptr
    other = pool.take(n + 1, torch.bfloat16, CPU)
    assert other.numel() == n + 1 and other.data_ptr() != ptr


def test_a_tensor_that_was_not_lent_is_never_lent_out(seed):
    pool = OutputBuffers()
    n = _size()
    foreign = torch.empty(n, dtype=torch.float32)
    pool.give(foreign)  # e.g. an input copied through unchanged
    lent = pool.take(n, torch.float32, CPU)
    assert lent.data_ptr() != foreign.data_ptr()
    sliced = lent[1:]
    pool.give(sliced)  # a part of a lent buffer is not the buffer
    assert pool.take(n, torch.float32, CPU).data_ptr() != lent.data_ptr()


def test_kept_bytes_and_a_fresh_buffer_stay_under_the_cap(seed, monkeypatch):
    cap = _size(40_000, 80_000)
    monkeypatch.setattr(outputs, "KEEP_BYTES", cap)
    pool = OutputBuffers()
    sizes = [_size(1000, cap // 8) for _ in range(6)]
    bufs = [pool.take(n, torch.float32, CPU) for n in sizes]
    for b in bufs:
        pool.give(b)
    assert 0 < pool.free_bytes <= cap
    big = cap // 4 - 10  # float32: cap - 40 bytes
    pool.take(big, torch.float32, CPU)
    assert pool.free_bytes + 4 * big <= cap


def test_a_buffer_starts_where_its_bytes_sit_in_the_file_modulo_a_page(seed):
    """So the writer sends it to the disk without copying it; a recycled buffer is realigned."""
    pool = OutputBuffers()
    n = _size()
    for dtype in (torch.bfloat16, torch.float32):
        for _ in range(3):
            at = int(torch.randint(0, 10**9, ())) * dtype.itemsize
            buf = pool.take(n, dtype, CPU, at)
            assert buf.numel() == n and buf.dtype == dtype and buf.data_ptr() % BLOCK == at % BLOCK
            buf.fill_(1)  # all of it is usable
            pool.give(buf)
    odd = pool.take(n, torch.float32, CPU, 4 * int(torch.randint(0, 1000, ())) + 2)  # no float32 there
    assert odd.data_ptr() % 4 == 0
