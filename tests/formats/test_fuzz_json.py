"""Fuzz the JSON k2quant reads from directories it does not own: index, config, safetensors header,
convert manifest and run state, qat run record. Any mutation gives either a working result or one
K2QuantError naming the mutated file; never another exception."""
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from k2quant.errors import K2QuantError
from k2quant.formats import convert, output, plan, shards
from k2quant.formats.checkpoint import Checkpoint
from k2quant.qat import state as qat_state
from k2quant.quant import scheme as qscheme

INDEX, CONFIG, MANIFEST = "model.safetensors.index.json", "config.json", "k2quant_manifest.json"
SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
          | st.text(max_size=6) | st.sampled_from(["", "..", "/dev/zero", "../x.safetensors", "sub", "F32", "I32"]))
values = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                      max_leaves=6)


def _paths(obj, prefix=(), limit=400):
    """Every key path in a JSON value (capped, so a weight_map does not dominate)."""
    out = [prefix]
    if isinstance(obj, dict):
        items = list(obj.items())[:40]
    elif isinstance(obj, list):
        items = list(enumerate(obj))[:40]
    else:
        items = []
    for k, v in items:
        out += _paths(v, prefix + (k,), limit)
    return out[:limit]


def mutate(obj, data):
    """One structural mutation of ``obj`` (a JSON value), or raw text damage: returns the bytes to write."""
    op = data.draw(st.sampled_from(["replace", "delete", "deep", "text", "type"]), label="op")
    if op == "text":
        raw = json.dumps(obj).encode()
        cut = data.draw(st.integers(0, len(raw)), label="cut")
        junk = data.draw(st.binary(max_size=4), label="junk")
        return raw[:cut] + junk + raw[cut + len(junk):]
    if op == "type":
        return json.dumps(data.draw(values, label="top")).encode()
    obj = json.loads(json.dumps(obj))
    path = data.draw(st.sampled_from(_paths(obj)[1:] or [()]), label="path")
    if not path:
        return json.dumps(data.draw(values)).encode()
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if op == "delete":
        del parent[path[-1]]
    elif op == "deep":
        parent[path[-1]] = json.loads("[" * 900 + "]" * 900) if data.draw(st.booleans()) else None
        raw = json.dumps(obj).encode()
        if parent[path[-1]] is None:  # 100k-deep: more than any JSON parser's recursion limit
            raw = raw.replace(b"null", b"[" * 100_000 + b"]" * 100_000, 1)
        return raw
    else:
        parent[path[-1]] = data.draw(values, label="value")
    return json.dumps(obj).encode()


def expect_clean(fn, where: Path):
    """``fn()`` works, or raises one K2QuantError that names ``where``."""
    try:
        return fn()
    except K2QuantError as exc:
        assert where.name in str(exc), (where.name, str(exc)[:500])
        return None


@pytest.fixture(scope="module")
def ckpts(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    out = root / "int4"
    convert.convert(tiny_dirs["fp8"], out, "int4", qscheme.for_target("int4"), max_shard_size=1_500_000)
    return tiny_dirs["fp8"], out


def _fresh(src, tmp_path, name):
    dst = tmp_path / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)
    return dst


@settings(**SETTINGS)
@given(data=st.data(), which=st.sampled_from([INDEX, CONFIG]))
def test_index_and_config_mutations(ckpts, tmp_path, data, which):
    src = _fresh(ckpts[0], tmp_path, "src")
    f = src / which
    f.write_bytes(mutate(json.loads(f.read_text()), data))
    expect_clean(lambda: plan.make_plan(Checkpoint(src), "int4", qscheme.for_target("int4")), f)


@pytest.mark.parametrize("meta", [None, {}, {"format": "pt"}, [], "", 0, False, {"a": 1}])
def test_header_metadata_is_read_as_the_library_reads_it(tmp_path, meta):
    """``__metadata__`` null or a map of strings is read; anything else (a falsy [], "", 0 or false too, which
    the fuzz test above once drew) is refused with the file's name, exactly where the safetensors library
    refuses it."""
    f = tmp_path / "m.safetensors"
    header = json.dumps({"__metadata__": meta, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    f.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(4))
    try:
        with safe_open(str(f), "pt") as sf:
            library = sf.metadata() or {}
    except Exception:  # noqa: BLE001 - the library's own error type
        library = None
    got = expect_clean(lambda: shards.read_header(f), f)
    assert (got is None) == (library is None), (meta, got, library)
    if got is not None:
        assert got[1] == library


@settings(**SETTINGS)
@given(data=st.data())
def test_header_json_mutations(ckpts, tmp_path, data):
    """The header's JSON mutated and rewritten with a correct length: k2quant refuses it with the file's name,
    or reads exactly what the safetensors library reads."""
    f = _fresh(ckpts[0], tmp_path, "src") / "model-00001-of-00003.safetensors"
    raw = f.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    new = mutate(json.loads(raw[8:8 + hlen]), data)
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + hlen:])
    got = expect_clean(lambda: shards.read_header(f), f)
    if got is not None:
        with safe_open(str(f), "pt") as sf:  # the oracle accepts it too, with the same tensors
            for name, info in got[0].items():
                t = sf.get_tensor(name)
                assert (tuple(t.shape), t.dtype) == (info.shape, shards.DTYPES[info.dtype])
                assert torch.equal(t.view(torch.uint8).reshape(-1) if t.numel() else t.reshape(-1).view(torch.uint8),
                                   shards.read_tensor(info).view(torch.uint8).reshape(-1) if t.numel() else
                                   shards.read_tensor(info).reshape(-1).view(torch.uint8))


@settings(**SETTINGS)
@given(data=st.data(), which=st.sampled_from(["manifest", "settings", "record"]))
def test_manifest_and_run_state_mutations(ckpts, tmp_path, data, which):
    src, done = ckpts
    dst = _fresh(done, tmp_path, "dst")
    ck = Checkpoint(src)
    p = plan.make_plan(ck, "int4", qscheme.for_target("int4"), 1_500_000)
    settings_ = output.run_settings(p, ck)
    state = dst / output.STATE_DIR
    if which == "manifest":
        f = dst / MANIFEST
    else:  # an interrupted run: its settings and one shard record under .k2q-state/
        man = json.loads((dst / MANIFEST).read_text())
        (dst / MANIFEST).unlink()
        state.mkdir()
        (state / "settings.json").write_text(json.dumps(man["settings"]))
        name = p.shard_names[0]
        (state / f"{name}.json").write_text(json.dumps(man["shards"][name] | {"shard": name}))
        f = state / ("settings.json" if which == "settings" else f"{name}.json")
    f.write_bytes(mutate(json.loads(f.read_text()), data))
    expect_clean(lambda: output.owned_files(dst), f)
    expect_clean(lambda: output.resume_state(dst, settings_, p), f)


@settings(**SETTINGS)
@given(data=st.data())
def test_qat_run_record_mutations(tmp_path, data):
    from k2quant.qat.config import QatConfig

    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    cfg = QatConfig(src="src", data=["d"], out="o", eval_data=None)
    f = state / qat_state.RUN_FILE
    f.write_bytes(mutate({"config": cfg.__dict__, "step": 3, "processes": 1}, data))
    got = expect_clean(lambda: qat_state.read_run(state), f)
    if got is not None:
        assert isinstance(got[0], QatConfig) and type(got[1]) is int
