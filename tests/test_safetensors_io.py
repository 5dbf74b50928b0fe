"""Our header reader and streaming shard writer agree with the reference safetensors library."""
import json
import os
import resource
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ops.errors import CheckpointError
from mergekit_ops.safetensors_io import ShardWriter, plan_shards, read_header, read_tensor


def _random_state():
    return {
        "a.weight": torch.randn(5, 7),
        "b.weight": torch.randn(3, 4).to(torch.bfloat16),
        "c.bias": torch.randn(9).half(),
        "d.steps": torch.randint(0, 100, (4,), dtype=torch.int64),
        "e.scalar": torch.randn(()),
    }


def test_reader_reads_reference_files_exactly(tmp_path):
    state = _random_state()
    save_file(state, str(tmp_path / "x.safetensors"))
    infos, meta = read_header(tmp_path / "x.safetensors")
    assert set(infos) == set(state)
    for name, t in state.items():
        got = read_tensor(infos[name])
        assert got.dtype == t.dtype and torch.equal(got, t)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's fault-around maps the pages")
def test_a_read_tensor_is_mapped_before_it_is_used(tmp_path, seed):
    """The read-ahead thread maps a tensor's pages (read_tensor), so the merge does not fault them
    in one by one: reading all of it afterwards takes few page faults (16 per 64 KiB without)."""
    t = torch.randn(int(torch.randint(2, 4, ())) << 20)
    save_file({"t": t}, str(tmp_path / "x.safetensors"))
    info = read_header(tmp_path / "x.safetensors")[0]["t"]
    got = read_tensor(info)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert torch.equal(got, t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < info.nbytes // 4096 // 64, faults


def test_writer_output_loads_with_reference_library(tmp_path):
    state = _random_state()
    items = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    shards = plan_shards(items, max_bytes=10**9)
    writer = ShardWriter(tmp_path, shards)
    for k, v in state.items():
        writer.write(k, v)
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_shards_respect_byte_limit_and_index_maps_every_tensor(tmp_path):
    state = {f"t{i}": torch.randn(10, 10) for i in range(7)}  # 400 bytes each
    items = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    shards = plan_shards(items, max_bytes=1000)
    assert [len(s.tensors) for s in shards] == [2, 2, 2, 1]
    writer = ShardWriter(tmp_path, shards)
    for k, v in state.items():
        writer.write(k, v)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 7 * 400
    assert set(index["weight_map"]) == set(state)
    for name, fname in index["weight_map"].items():
        assert fname == f"model-0000{int(name[1]) // 2 + 1}-of-00004.safetensors"
        assert (tmp_path / fname).stat().st_size <= 1000 + 1000  # data bound + header
        assert torch.equal(load_file(str(tmp_path / fname))[name], state[name])


def test_oversized_tensor_gets_its_own_shard():
    items = [("small", torch.float32, (2,)), ("big", torch.float32, (100,)), ("small2", torch.float32, (2,))]
    assert [[n for n, _, _ in s.tensors] for s in plan_shards(items, 100)] == [["small"], ["big"], ["small2"]]


def test_writer_rejects_out_of_plan_tensor(tmp_path):
    writer = ShardWriter(tmp_path, plan_shards([("a", torch.float32, (2,))], 100))
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("a", torch.zeros(3))
    writer.abort()


def test_truncated_file_is_reported_with_its_path(tmp_path):
    save_file({"w": torch.randn(100)}, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*'w'.*truncated"):
        read_header(tmp_path / "x.safetensors")


def test_garbage_file_is_not_a_safetensors_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="x.safetensors"):
        read_header(tmp_path / "x.safetensors")


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_sequential_file_writes_exact_bytes_across_stage_boundaries(tmp_path, monkeypatch, direct):
    from mergekit_ops import safetensors_io

    monkeypatch.setattr(safetensors_io, "STAGE_BYTES", 2 * safetensors_io.BLOCK)
    if not direct:
        monkeypatch.setattr(safetensors_io, "O_DIRECT", 0)
    pieces = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in (3, 8192, 5000, 1, 12289, 0, 77)]
    f = safetensors_io.SequentialFile(tmp_path / "x.bin")
    if direct and f.stage is None:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert direct or f.stage is None
    for p in pieces:
        f.write(memoryview(p.numpy()))
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == b"".join(p.numpy().tobytes() for p in pieces)


def test_aligned_data_is_written_from_its_own_memory(tmp_path, monkeypatch, seed):
    """Data whose address matches its file offset modulo a block skips the stage (its whole
    blocks); they wait for flush(), after which the data may change; the file holds exactly the
    bytes written, aligned or not, in order, at every flush."""
    import mmap

    from mergekit_ops import safetensors_io as sio

    monkeypatch.setattr(sio, "STAGE_BYTES", 2 * sio.BLOCK)
    monkeypatch.setattr(sio, "DIRECT_MIN_BYTES", sio.BLOCK)
    f = sio.SequentialFile(tmp_path / "x.bin")
    if f.stage is None:
        pytest.skip("this filesystem refuses O_DIRECT")
    stage_at = sio._address(memoryview(f.stage))
    unstaged, calls = [], []
    real_write = sio._write_all

    def recording(fd, *parts):
        calls.append(len(parts))
        unstaged.extend(len(p) for p in parts if not stage_at <= sio._address(p) < stage_at + sio.STAGE_BYTES)
        real_write(fd, *parts)
    monkeypatch.setattr(sio, "_write_all", recording)
    written, unflushed, expect_unstaged, pos = [], [], 0, 0
    for i in range(16):
        n = int(torch.randint(0 if i else 2 * sio.BLOCK, 6 * sio.BLOCK, ()))
        aligned = i == 0 or bool(torch.randint(0, 2, ()))  # the first one surely
        start = pos % sio.BLOCK + (0 if aligned else 1 + int(torch.randint(0, sio.BLOCK - 1, ())))
        start += sio.BLOCK * int(torch.randint(0, 4, ()))
        memory = mmap.mmap(-1, 16 * sio.BLOCK)  # page-aligned, this piece's own
        piece = memoryview(memory)[start:start + n]
        piece[:] = torch.randint(0, 256, (n,), dtype=torch.uint8).numpy().tobytes()
        head = -pos % sio.BLOCK
        if aligned and n >= head + sio.BLOCK:
            expect_unstaged += (n - head) // sio.BLOCK * sio.BLOCK
        f.write(piece)
        written.append(bytes(piece))
        unflushed.append(piece)
        pos += n
        if torch.randint(0, 3, ()) == 0:
            f.flush()
            whole = pos - pos % sio.BLOCK
            assert (tmp_path / "x.bin").read_bytes() == b"".join(written)[:whole]
            for p in unflushed:  # written: changing the memory now changes nothing
                p[:] = bytes(len(p))
            unflushed.clear()
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == b"".join(written)
    assert sum(unstaged) == expect_unstaged
    assert max(calls) > 1  # a flush sends staged blocks and bodies in one call


def test_write_all_resumes_short_writes_in_order(tmp_path, monkeypatch, seed):
    """_write_all sends its parts in order, at most IOV_MAX per call, resuming where a call
    stopped short (mid-part or between parts)."""
    from mergekit_ops import safetensors_io as sio

    monkeypatch.setattr(sio, "IOV_MAX", 2)
    real_writev, real_write = os.writev, os.write
    counts = []

    def short_writev(fd, buffers):
        assert 1 < len(buffers) <= 2
        counts.append(len(buffers))
        limit = int(torch.randint(1, sum(len(b) for b in buffers) + 1, ()))
        first = buffers[0][:limit]
        return real_writev(fd, [first, buffers[1][:limit - len(first)]])

    def short_write(fd, data):
        return real_write(fd, data[:int(torch.randint(1, len(data) + 1, ()))])
    monkeypatch.setattr(sio.os, "writev", short_writev)
    monkeypatch.setattr(sio.os, "write", short_write)
    parts = [torch.randint(0, 256, (int(torch.randint(0, 300, ())),), dtype=torch.uint8).numpy().tobytes()
             for _ in range(7)]
    fd = os.open(tmp_path / "x.bin", os.O_WRONLY | os.O_CREAT)
    try:
        sio._write_all(fd, *(memoryview(p) for p in parts))
    finally:
        os.close(fd)
    assert (tmp_path / "x.bin").read_bytes() == b"".join(parts)
    assert counts


def test_writer_offsets_are_where_the_tensors_land(tmp_path):
    state = _random_state()
    shards = plan_shards([(k, v.dtype, tuple(v.shape)) for k, v in state.items()], max_bytes=60)
    writer = ShardWriter(tmp_path, shards)
    offsets = writer.offsets()
    for k, v in state.items():
        writer.write(k, v)
    writer.close()
    for path in tmp_path.glob("*.safetensors"):
        for name, info in read_header(path)[0].items():
            assert offsets[name] == info.offset


def test_a_failed_write_aborts_cleanly(tmp_path, monkeypatch):
    from mergekit_ops import safetensors_io

    state = {"a": torch.randn(3000, 7), "b": torch.randn(5000)}
    writer = ShardWriter(tmp_path, plan_shards([(k, v.dtype, tuple(v.shape)) for k, v in state.items()], 10**9))
    writer.write("a", state["a"])

    def disk_full(fd, buffers):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io.os, "writev", disk_full)
    monkeypatch.setattr(safetensors_io.os, "write", disk_full)
    writer.write("b", state["b"])
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    writer.abort()  # closes without flushing again and without raising
    assert writer._file is None
