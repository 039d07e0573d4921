"""Mutation test on safetensors headers: any corruption gives a FormatError naming the file, never a crash
or a tensor that reaches past the end of the file."""
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from k2quant.errors import FormatError
from k2quant.formats import shards


def make(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.randn(16, 24).to(torch.bfloat16), "a.weight_scale_inv": torch.rand(1, 1),
               "b.weight": torch.randn(8, 8).to(torch.float8_e4m3fn)}, str(path), metadata={"format": "pt"})
    return path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_header_mutations(tmp_path, data):
    path = make(tmp_path)
    raw = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<Q", raw[:8])
    kind = data.draw(st.sampled_from(["flip", "set", "truncate", "length"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(8, 8 + hlen - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "set":
        i = data.draw(st.integers(8, 8 + hlen - 1))
        raw[i] = data.draw(st.sampled_from(list(b'0123456789",:{}[]-eE ')))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    path.write_bytes(bytes(raw))
    try:
        infos, _ = shards.read_header(path)
    except FormatError as exc:
        assert str(path) in str(exc)
        return
    size = len(raw)
    for info in infos.values():  # whatever was accepted is readable and inside the file
        assert 0 <= info.start <= info.end <= size
        t = shards.read_tensor(info)
        assert tuple(t.shape) == info.shape
