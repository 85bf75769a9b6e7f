"""checkpoints/pinned_read.py: plain reads through a buffer ring give the file's tensors exactly."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35fp8.checkpoints.pinned_read import PinnedReader
from sd35fp8.checkpoints.safetensors_file import SafetensorsFile


def _file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(37, 11, generator=g).to(torch.bfloat16),
        "b": torch.randn(1000, generator=g),  # spans several small chunks
        "c": torch.randn(5, 7, generator=g).to(torch.float8_e4m3fn),
        "d": torch.tensor(3.5),  # 0-d
        "e": torch.zeros(0, 4),  # empty
        "f": torch.arange(10, dtype=torch.int64),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    return path


def _check(reader, path, device):
    sf = SafetensorsFile(path)
    shard = sf._shards[0]
    fd = os.open(path, os.O_RDONLY)
    try:
        ref = load_file(str(path))
        for key in sf.keys():
            info = sf.info(key)
            got = reader.read(fd, shard.data_offset + info.begin, info.nbytes, info.dtype, info.shape,
                              torch.device(device))
            assert got.dtype == ref[key].dtype and tuple(got.shape) == tuple(ref[key].shape), key
            assert torch.equal(got.cpu().reshape(-1).view(torch.uint8), ref[key].reshape(-1).view(torch.uint8)), key
    finally:
        os.close(fd)


def test_ring_read_equals_file_cpu(tmp_path):
    # chunk of 256 bytes, 2 buffers: the 4000-byte tensor "b" takes 16 chunks through the ring
    _check(PinnedReader(chunk=256, ring=2), _file(tmp_path), "cpu")


def test_threaded_read_equals_file_cpu(tmp_path, monkeypatch):
    # each 256-byte chunk split over 3 reader threads (parts of >= 16 bytes)
    from sd35fp8.checkpoints import pinned_read

    monkeypatch.setattr(pinned_read, "MIN_PART", 16)
    _check(PinnedReader(chunk=256, ring=2, threads=3), _file(tmp_path), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_read_equals_file_cuda(tmp_path):
    path = _file(tmp_path)
    _check(PinnedReader(chunk=256, ring=2), path, "cuda")
    sf = SafetensorsFile(path)  # SafetensorsFile.get on CUDA takes this path
    ref = load_file(str(path))
    for key in sf.keys():
        assert torch.equal(sf.get(key, "cuda").cpu().reshape(-1).view(torch.uint8), ref[key].reshape(-1).view(torch.uint8))
