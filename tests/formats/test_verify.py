"""k2quant verify: passes on real conversions, and names the file and tensor of every planted fault."""
import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from k2quant.cli import main
from k2quant.formats import convert
from k2quant.formats.verify import verify
from k2quant.quant import scheme as qscheme


def conv(src, dst, target, **kw):
    convert.convert(src, dst, target, qscheme.for_target(target, **kw))
    return dst


@pytest.fixture(scope="module")
def outputs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    return {(s, t): conv(tiny_dirs[s], root / f"{s}-{t}", t) for s in ("bf16", "fp8", "int4")
            for t in ("bf16", "fp8", "int4")}


def test_every_direction_verifies(tiny_dirs, outputs):
    for (s, t), dst in outputs.items():
        r = verify(tiny_dirs[s], dst)
        assert r.ok, (s, t, r.problems[:3])
        assert r.checked["items"] == 91 and r.checked["shards_hashed"] == 1
        if t == "int4" and s != "int4":
            assert r.checked["quantized"] == 48 and 0.5 < r.max_error["routed_expert"] <= 1.0
        if s == t != "bf16":
            assert r.checked["codes_kept"] == {"fp8": 72, "int4": 48}[t]
    r = verify(tiny_dirs["bf16"], outputs[("bf16", "fp8")])
    assert r.checked["quantized"] == 72 and 0.2 < max(r.max_error.values()) <= 1.0


def test_kimi_rule_and_wide_targets_verify(tiny_dirs, tmp_path):
    dst = conv(tiny_dirs["fp8"], tmp_path / "o", "int4", scale_rule="kimi", targets=[r"re:.*(_proj|_proj_with_mqa)$"], ignore=[])
    r = verify(tiny_dirs["fp8"], dst)
    assert r.ok, r.problems[:3]
    assert r.checked["quantized"] == 72  # every Linear incl. attention and the 160-row kv_a


def mutate(path, name, fn):
    f = next(p for p in path.glob("*.safetensors") if name in load_file(str(p)))
    sd = load_file(str(f))
    sd = fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})
    return f


def run_cli(src, dst):
    res = CliRunner().invoke(main, ["verify", str(src), str(dst), "--json"])
    return res.exit_code, json.loads(res.output)


def test_flipped_byte_is_caught_by_hash_and_value(tiny_dirs, outputs, tmp_path):
    dst = tmp_path / "o"
    shutil.copytree(outputs[("bf16", "int4")], dst)
    f = next(dst.glob("*.safetensors"))
    raw = bytearray(f.read_bytes())
    raw[-5000] ^= 0x10  # a byte in the data of a late tensor
    f.write_bytes(bytes(raw))
    code, rep = run_cli(tiny_dirs["bf16"], dst)
    assert code == 1 and not rep["ok"]
    hashes = [p for p in rep["problems"] if "blake3 differs from the manifest" in p["problem"]]
    assert hashes and hashes[0]["file"].endswith(f.name)


def test_a_manifest_of_an_earlier_version_with_plain_sha256_is_still_checked(tiny_dirs, outputs, tmp_path):
    """Manifests of earlier k2quant versions hold "sha256" (of the whole file): verify checks that one."""
    dst = tmp_path / "o"
    shutil.copytree(outputs[("bf16", "int4")], dst)
    man_path = dst / "k2quant_manifest.json"
    man = json.loads(man_path.read_text())
    for name, rec in man["shards"].items():
        del rec["blake3"]
        rec["sha256"] = hashlib.sha256((dst / name).read_bytes()).hexdigest()
    man_path.write_text(json.dumps(man))
    code, rep = run_cli(tiny_dirs["bf16"], dst)
    assert code == 0 and rep["ok"], rep["problems"]
    f = next(dst.glob("*.safetensors"))
    raw = bytearray(f.read_bytes())
    raw[-5000] ^= 0x10
    f.write_bytes(bytes(raw))
    code, rep = run_cli(tiny_dirs["bf16"], dst)
    assert code == 1 and any("sha256 differs from the manifest" in p["problem"] and p["file"].endswith(f.name)
                             for p in rep["problems"])


def test_missing_tensor(tiny_dirs, outputs, tmp_path):
    dst = tmp_path / "o"
    shutil.copytree(outputs[("fp8", "int4")], dst)
    name = "model.layers.2.mlp.experts.6.down_proj.weight_scale"
    mutate(dst, name, lambda sd: {k: v for k, v in sd.items() if k != name})
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    del idx["weight_map"][name]
    (dst / "model.safetensors.index.json").write_text(json.dumps(idx))
    code, rep = run_cli(tiny_dirs["fp8"], dst)
    assert code == 1
    assert any("lacks ['model.layers.2.mlp.experts.6.down_proj.weight_scale']" in p["problem"]
               for p in rep["problems"]), rep["problems"]


def test_wrong_scale(tiny_dirs, outputs, tmp_path):
    dst = tmp_path / "o"
    shutil.copytree(outputs[("bf16", "fp8")], dst)
    (dst / "k2quant_manifest.json").unlink()  # no hash to lean on: the error bound must catch it
    name = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    f = mutate(dst, name, lambda sd: sd | {name: sd[name] * 1.5})
    code, rep = run_cli(tiny_dirs["bf16"], dst)
    assert code == 1
    assert rep["problems"] == [{
        "file": str(f), "tensor": "model.layers.1.self_attn.kv_b_proj.weight",
        "problem": rep["problems"][0]["problem"]}]
    assert "the allowed error (E4M3 rounding of its tile scale): wrong scale or codes" in rep["problems"][0]["problem"]


def test_config_naming_the_wrong_format(tiny_dirs, outputs, tmp_path):
    dst = tmp_path / "o"
    shutil.copytree(outputs[("bf16", "int4")], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg))
    code, rep = run_cli(tiny_dirs["bf16"], dst)
    assert code == 1
    assert "quantization_config says FP8 but no weight is F8_E4M3" in rep["problems"][0]["problem"]
    assert rep["problems"][0]["file"] == str(dst)


def test_quantized_against_its_ignore_list(tiny_dirs, outputs, tmp_path):
    dst = tmp_path / "o"
    shutil.copytree(outputs[("bf16", "int4")], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append("re:.*experts\\.3\\..*")
    (dst / "config.json").write_text(json.dumps(cfg))
    code, rep = run_cli(tiny_dirs["bf16"], dst)
    assert code == 1
    missing = [p for p in rep["problems"] if p["problem"].startswith("missing: source")]
    assert {p["tensor"] for p in missing} == {f"model.layers.{l}.mlp.experts.3.{p}_proj.weight"
                                             for l in (1, 2) for p in ("gate", "up", "down")}


def test_verify_table_output(tiny_dirs, outputs):
    res = CliRunner().invoke(main, ["verify", str(tiny_dirs["fp8"]), str(outputs[("fp8", "int4")])])
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "48 quantized within bounds checked" in text and "OK" in text
