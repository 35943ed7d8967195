"""The chunked safetensors reader (GPU loading path) against safetensors' own reader: every
tensor, dtype and shape, whatever the chunk size, with tensors spanning chunks and shards."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from localsgl.store.safetensors_stream import UnsupportedShardError, iter_to_device


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(3, 5, generator=g), "b16": torch.randn(7, generator=g).to(torch.bfloat16),
         "i8": torch.randint(-100, 100, (13,), dtype=torch.int8, generator=g), "h": torch.randn(100, 3, generator=g).half(),
         "empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5), "long": torch.randn(1000, generator=g),
         "ids": torch.arange(9, dtype=torch.int64), "mask": torch.tensor([True, False, True])}
    b = {"second.weight": torch.randn(50, 2, generator=g)}
    save_file(a, d / "model-00001-of-00002.safetensors")
    save_file(b, d / "model-00002-of-00002.safetensors")
    return sorted(d.glob("*.safetensors"))


def _reference(files, dtype):
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


@pytest.mark.parametrize("chunk_bytes,depth", [(16, 1), (100, 3), (4096, 2), (1 << 20, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_matches_safetensors(shards, chunk_bytes, depth, dtype):
    got = dict(iter_to_device(shards, dtype, torch.device("cpu"), chunk_bytes=chunk_bytes, depth=depth))
    want = _reference(shards, dtype)
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert torch.equal(got[k], w), k


def test_unknown_dtype_is_declined_before_anything_is_read(tmp_path):
    import json
    import struct

    header = json.dumps({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    f = tmp_path / "odd.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(UnsupportedShardError):
        iter_to_device([f], torch.float32, torch.device("cpu"))
