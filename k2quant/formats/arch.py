"""What each tensor of a checkpoint is, learned from the checkpoint's own architecture.

transformers builds the model its ``config.json`` describes on the meta device (no weights, no memory,
no remote code): every ``nn.Linear`` module, every fused-experts module (3-D ``gate_up_proj``/``down_proj``
parameters, stored on disk per expert as ``<experts>.<e>.<proj>``), the output embeddings, and the parameter
count. ``kimi_k2`` builds as ``deepseek_v3``. Layers past ``num_hidden_layers`` (DeepSeek-V3's MTP layer)
are read as the last decoder layer, which they copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import re
from pathlib import Path

from k2quant.errors import FormatError
from k2quant.formats import layout

#: model_type values that build as transformers' DeepseekV3 (Kimi's configs say kimi_k2)
ALIASES = {"kimi_k2": "deepseek_v3"}
#: config keys transformers must not see: quantization is k2quant's business, remote code is never run
DROP_KEYS = ("quantization_config", "compression_config", "auto_map")
_PER_EXPERT = re.compile(r"^(?P<container>.+)\.(?P<e>\d+)\.(?P<leaf>[^.]+)$")
_LAYER = re.compile(r"^(?P<head>.*?\blayers)\.(?P<i>\d+)\.(?P<rest>.+)$")

ATTENTION, MLP, EXPERT, LM_HEAD, OTHER = "attention", "mlp", "routed_expert", "lm_head", "other"


@dataclasses.dataclass(frozen=True)
class Arch:
    """The Linear layers of a model as named on disk, each with its kind, and the fused-expert containers."""

    model_class: str
    model_type: str
    linears: dict[str, str]  # nn.Linear module name -> kind (attention, mlp, lm_head, other)
    experts: dict[str, tuple[str, int]]  # fused experts module -> (class name, num_experts)
    attention_modules: tuple[str, ...]  # child names of decoder layers that hold attention (e.g. self_attn)
    lm_head: str | None
    num_params: int
    num_layers: int | None
    num_buffer_values: int = 0  # persistent buffers (saved with the weights: DeepSeek's router bias)
    #: transformers' own renamings from checkpoint names to module names (Mixtral: block_sparse_moe -> mlp)
    renames: tuple[tuple[str, str], ...] = ()

    def _in_skeleton(self, module: str) -> str:
        """The module name in the model: transformers' checkpoint renamings applied, and DeepSeek-V3's MTP
        layers (index >= num_hidden_layers) read as the last decoder layer."""
        for pattern, repl in self.renames:
            module = re.sub(pattern, repl, module)
        m = _LAYER.match(module)
        if m and self.num_layers and int(m.group("i")) >= self.num_layers:
            return f"{m.group('head')}.{self.num_layers - 1}.{m.group('rest')}"
        return module

    def past_last_layer(self, name: str) -> bool:
        """A tensor of a layer the model does not build (DeepSeek-V3's MTP layer, index >= num_hidden_layers)."""
        m = _LAYER.match(name)
        return bool(m and self.num_layers and int(m.group("i")) >= self.num_layers)

    def expert_of(self, module: str) -> str | None:
        """The fused-experts container of a per-expert module name (``...experts.3.up_proj``), else None."""
        m = _PER_EXPERT.match(self._in_skeleton(module))
        if m and m.group("container") in self.experts and int(m.group("e")) < self.experts[m.group("container")][1]:
            return m.group("container")
        return None

    def kind(self, module: str) -> str | None:
        """attention / mlp / routed_expert / lm_head / other for a Linear module name; None if not a Linear."""
        module = self._in_skeleton(module)
        if module in self.linears:
            return self.linears[module]
        return EXPERT if self.expert_of(module) else None

    def is_linear(self, module: str) -> bool:
        return self.kind(module) is not None

    def report_class(self, name: str) -> str:
        """``layout.tensor_class`` for reports, with experts the names do not tell (Mixtral's w1/w2/w3) found here."""
        cls = layout.tensor_class(name, self.num_layers)
        module = name.removesuffix(".weight")
        return "routed_expert" if cls == "other" and self.kind(module) == EXPERT else cls

    def classes(self, module: str) -> tuple[str, ...]:
        """The class names a compressed-tensors target can name this module by (``Linear``, experts class)."""
        container = self.expert_of(module)
        if container:
            return ("Linear", self.experts[container][0])
        return ("Linear",) if self.is_linear(module) else ()


def hf_config_dict(config: dict) -> dict:
    """The config as transformers should read it: no quantization block, no remote code, Kimi as DeepSeek-V3."""
    cfg = {k: v for k, v in config.items() if k not in DROP_KEYS}
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise FormatError(f"config.json: model_type is {model_type!r}; k2quant learns what each tensor is from the "
                          f"architecture config.json names: restore config.json from the model's release")
    cfg["model_type"] = ALIASES.get(model_type, model_type)
    if model_type in ALIASES:
        cfg.pop("architectures", None)
    return cfg


def hf_config(config: dict):
    """A transformers config object for ``config`` (a ``config.json`` dict); unknown types are an error."""
    from transformers import AutoConfig

    cfg = hf_config_dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type not in _known_model_types():
        raise FormatError(f"config.json: model_type {model_type!r} is not an architecture this transformers knows; "
                          f"k2quant runs no remote code: use a transformers release that has it")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except Exception as exc:  # noqa: BLE001 - transformers validates the untrusted config with many error types
        raise FormatError(f"config.json: transformers refuses this {model_type} config ({_first_line(exc)}); "
                          f"restore config.json from the model's release") from None


def skeleton(config: dict, attn_implementation: str | None = None, experts_implementation: str | None = None):
    """The model ``config`` describes, built on the meta device (no memory, no weights); optionally with the
    attention / experts implementation a caller runs it with (set where the config has them)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf = hf_config(config)
        if attn_implementation:
            hf._attn_implementation = attn_implementation
        if experts_implementation and hasattr(hf, "_experts_implementation"):
            hf._experts_implementation = experts_implementation
        try:
            return AutoModelForCausalLM.from_config(hf)
        except FormatError:
            raise
        except Exception as exc:  # noqa: BLE001 - building the model runs the untrusted config's values
            raise FormatError(f"config.json: transformers cannot build a causal LM from this "
                              f"{config.get('model_type')!r} config ({_first_line(exc)}); restore config.json from "
                              f"the model's release (k2quant runs no remote code)") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}"


@functools.cache
def _known_model_types() -> frozenset[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return frozenset(CONFIG_MAPPING.keys())


def from_config(config: dict) -> Arch:
    """The ``Arch`` of a ``config.json`` dict (cached per config)."""
    return _cached(json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _cached(config_json: str) -> Arch:
    path = _disk_path(config_json)
    a = _load(path) if path else None
    if a is None:
        config = json.loads(config_json)
        model = skeleton(config)
        a = describe(model, config.get("num_hidden_layers"))
        a = dataclasses.replace(a, renames=_renames(a.model_type))
        if path:
            _store(path, a)
    return a


#: bump when ``Arch`` or ``describe`` changes what they hold: older cache files are then never read
CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where ``Arch`` descriptions are kept between runs: ``$K2QUANT_ARCH_CACHE``, else ``arch/`` in k2quant's
    cache (``$K2QUANT_CACHE``, default ``~/.cache/k2quant``: the one the data wheels and SmolLM2 use)."""
    env = os.environ.get("K2QUANT_ARCH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("K2QUANT_CACHE") or Path.home() / ".cache" / "k2quant") / "arch"


def _disk_path(config_json: str) -> Path | None:
    """The cache file of this config under this transformers: importing transformers and building the model
    on the meta device costs seconds per run (~3 s for a 1-layer K2 on 2 cores), the description it gives
    is a few kB. None when transformers is not installed (the build then fails with its own message)."""
    try:
        version = importlib.metadata.version("transformers")
        # what transformers sees: the BF16, FP8 and INT4 checkpoints of one model share one entry
        seen = hf_config_dict(json.loads(config_json))
    except (importlib.metadata.PackageNotFoundError, FormatError):
        return None  # the build raises its own error
    key = json.dumps({"config": seen, "transformers": version, "v": CACHE_VERSION}, sort_keys=True)
    try:
        root = cache_dir()
    except (RuntimeError, KeyError):  # no home directory to find: no cache
        return None
    return root / "arch" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _load(path: Path) -> Arch | None:
    """The cached description, or None if absent or unreadable (it is then rebuilt; never an error)."""
    try:
        d = json.loads(path.read_text())
        a = Arch(d["model_class"], d["model_type"], dict(d["linears"]),
                 {k: (str(v[0]), int(v[1])) for k, v in d["experts"].items()}, tuple(d["attention_modules"]),
                 d["lm_head"], int(d["num_params"]), d["num_layers"], int(d["num_buffer_values"]),
                 tuple((str(a), str(b)) for a, b in d["renames"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
        return None
    ok = all(isinstance(k, str) and isinstance(v, str) for k, v in a.linears.items()) \
        and isinstance(a.model_class, str) and isinstance(a.model_type, str) \
        and (a.lm_head is None or isinstance(a.lm_head, str)) and (a.num_layers is None or type(a.num_layers) is int)
    return a if ok else None


def _store(path: Path, a: Arch) -> None:
    """Write the description atomically (temp, rename); a cache that cannot be written is skipped."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dataclasses.asdict(a)))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _renames(model_type: str) -> tuple[tuple[str, str], ...]:
    """transformers' plain renamings of checkpoint names for this family (its fused-expert merges excepted)."""
    try:
        from transformers import conversion_mapping
    except ImportError:  # a transformers without checkpoint conversion: names on disk are module names
        return ()
    out = []
    for rule in conversion_mapping.get_checkpoint_conversion_mapping(model_type) or ():
        if isinstance(rule, conversion_mapping.WeightRenaming):
            out += [(src, dst) for src, dst in zip(rule.source_patterns, rule.target_patterns)]
    return tuple(out)


def describe(model, num_layers: int | None = None) -> Arch:
    """Read a (meta or real) transformers model: its Linears with kinds, and its fused experts."""
    from torch import nn

    out = model.get_output_embeddings()
    lm_head = next((n for n, m in model.named_modules() if out is not None and m is out), None)
    classes = {n: type(m).__name__ for n, m in model.named_modules()}
    linears, experts, attn = {}, {}, set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linears[name] = _linear_kind(name, lm_head, classes, attn)
        elif is_fused_experts(module):
            experts[name] = (type(module).__name__, int(module.gate_up_proj.shape[0]))
    buffers = sum(b.numel() for m in model.modules() for n, b in m._buffers.items()
                  if b is not None and n not in m._non_persistent_buffers_set)
    return Arch(type(model).__name__, getattr(model.config, "model_type", ""), linears, experts,
                tuple(sorted(attn)), lm_head, sum(p.numel() for p in model.parameters()), num_layers, buffers)


def is_fused_experts(module) -> bool:
    """transformers 5's fused MoE experts: 3-D ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""
    from torch import nn

    return all(isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3
               for p in ("gate_up_proj", "down_proj"))


def _linear_kind(name: str, lm_head: str | None, classes: dict[str, str], attn: set[str]) -> str:
    if name == lm_head:
        return LM_HEAD
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        if classes.get(parent, "").endswith("Attention"):
            attn.add(parts[i - 1])
            return ATTENTION
        if classes.get(parent, "").endswith("DecoderLayer"):
            return MLP
    return OTHER
