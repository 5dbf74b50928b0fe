"""Exact top-k selection: the same set a stable sort would pick, ties by lowest flat index."""
import torch

from mergekit_ops.chunks import CHUNK
from mergekit_ops.select import TopK, magnitude_bits, top_k_mask


def _reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    flat = x.reshape(-1)
    order = torch.sort(-flat, stable=True).indices  # descending magnitude, lower index first on ties
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


def test_top_k_matches_stable_sort_on_random_values(seed):
    x = torch.randn(37, 53).abs()
    for k in (0, 1, 17, 1000, x.numel() - 1, x.numel()):
        assert torch.equal(top_k_mask(x, k), _reference_topk(x, k)), k


def test_top_k_breaks_ties_by_lowest_index(seed):
    # bf16-like data: very few distinct magnitudes, many ties at every threshold
    x = torch.randint(0, 4, (5000,)).float() * 0.125
    for k in torch.randint(1, 5000, (10,)).tolist():
        mask = top_k_mask(x, k)
        assert int(mask.sum()) == k
        assert torch.equal(mask, _reference_topk(x, k))


def test_top_k_of_a_tensor_longer_than_a_chunk(seed):
    x = torch.randint(0, 64, (CHUNK + 12_345,)).float()  # ties cross the chunk boundary
    k = int(torch.randint(1, x.numel(), ()))
    assert torch.equal(top_k_mask(x, k), _reference_topk(x, k))


def test_top_k_handles_values_differing_only_in_low_bits(seed):
    base = torch.full((1000,), 1.5)
    x = base + torch.randint(0, 50, (1000,)) * torch.finfo(torch.float32).eps
    assert torch.equal(top_k_mask(x, 123), _reference_topk(x, 123))


def _backwards(chunks):
    """map_bits that visits the chunks last to first (passes may take them in any order)."""
    return lambda fn: [fn(magnitude_bits(c)) for c in reversed(chunks)][::-1]


def test_streamed_chunks_select_the_same_set_as_the_whole_tensor(seed):
    x = torch.randint(-6, 7, (10_007,)).float() * 0.5  # many ties, spread over chunk boundaries
    k = int(torch.randint(1, 10_000, ()))
    chunks = list(x.split(999))
    [top] = TopK.select(_backwards(chunks), [k], x.numel())
    starts = range(0, x.numel(), 999)
    masks = {s: top.mask(s, magnitude_bits(c)) for s, c in reversed(list(zip(starts, chunks)))}  # any order
    streamed = torch.cat([masks[s] for s in starts]).bool()
    assert torch.equal(streamed, _reference_topk(x.abs(), k))


def test_chunks_with_many_ties_count_them_from_a_histogram(seed):
    x = torch.randint(0, 2, (400_000,)).float()  # ~75,000 tied entries per chunk: more than LO_BINS
    chunks = list(x.split(150_000))
    for k in (1, 100_000, 300_000):
        [top] = TopK.select(_backwards(chunks), [k], x.numel())
        starts = range(0, x.numel(), 150_000)
        masks = {s: top.mask(s, magnitude_bits(c)) for s, c in reversed(list(zip(starts, chunks)))}
        assert torch.equal(torch.cat([masks[s] for s in starts]).bool(), _reference_topk(x, k)), k
