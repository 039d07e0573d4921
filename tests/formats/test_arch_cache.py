"""The architecture description cached on disk: the same ``Arch`` without transformers, keyed by config and
transformers version, and a bad cache file rebuilt, never trusted."""
import json

import pytest

from k2quant.formats import arch, tiny


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("K2QUANT_ARCH_CACHE", str(tmp_path / "cache"))
    arch._cached.cache_clear()
    yield tmp_path / "cache"
    arch._cached.cache_clear()


def _no_transformers(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("built the model: the cache was not used")
    monkeypatch.setattr(arch, "skeleton", refuse)


def test_second_run_reads_the_description_without_building_the_model(fresh, monkeypatch):
    cfg = tiny.config_for("bf16")
    built = arch.from_config(cfg)  # oracle: transformers' own meta-device model
    assert len(list((fresh / "arch").glob("*.json"))) == 1
    arch._cached.cache_clear()
    _no_transformers(monkeypatch)
    assert arch.from_config(cfg) == built


def test_another_config_or_transformers_version_is_a_miss(fresh, monkeypatch):
    cfg = tiny.config_for("bf16")
    arch.from_config(cfg)
    arch._cached.cache_clear()
    other = cfg | {"num_hidden_layers": cfg["num_hidden_layers"] + 1}
    assert arch._disk_path(json.dumps(other, sort_keys=True)) != arch._disk_path(json.dumps(cfg, sort_keys=True))
    monkeypatch.setattr(arch.importlib.metadata, "version", lambda name: "0.0.0-other")
    assert not arch._disk_path(json.dumps(cfg, sort_keys=True)).exists()


@pytest.mark.parametrize("content", ["", "{", "[]", '{"model_class": 3}', "null"])
def test_a_corrupt_cache_file_is_rebuilt(fresh, content):
    cfg = tiny.config_for("bf16")
    built = arch.from_config(cfg)
    (path,) = (fresh / "arch").glob("*.json")
    path.write_text(content)
    arch._cached.cache_clear()
    assert arch.from_config(cfg) == built
    assert json.loads(path.read_text())["model_class"] == built.model_class  # rewritten whole


def test_the_quantized_checkpoints_of_a_model_share_its_entry(fresh, monkeypatch):
    built = arch.from_config(tiny.config_for("bf16"))
    arch._cached.cache_clear()
    _no_transformers(monkeypatch)
    for fmt in ("fp8", "int4"):  # the same model with a quantization_config: transformers never sees it
        assert arch.from_config(tiny.config_for(fmt)) == built


def test_no_home_directory_means_no_cache_not_an_error(fresh, monkeypatch):
    monkeypatch.delenv("K2QUANT_ARCH_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("K2QUANT_CACHE", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(arch.Path, "home", staticmethod(no_home))
    a = arch.from_config(tiny.config_for("bf16"))  # built by transformers, as without a cache
    assert a.model_type == "deepseek_v3" and a.experts
