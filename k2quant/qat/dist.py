"""QAT across processes: accelerate's FSDP2 (or DDP) around the student and teacher, and the per-rank
pieces of the run state.

Under FSDP2 every parameter is a ``DTensor`` sharded along dim 0 (``torch.chunk`` rows); ``weights.codes``
visits only a rank's own rows, so flip rates are counted on local shards and summed, never gathered.
fp32 masters and optimizer state are sharded like their parameters and saved per rank (``trainer.rank{r}-of-{w}.pt``); a resume needs the same number of
processes. The model itself is saved gathered (one ``model.safetensors``), which export reads.

One FSDP unit must not mix dtypes (FSDP2 asserts a uniform original dtype): the fake-quantized experts
are fp32 masters and the rest bf16, and transformers 5.24+ holds DeepSeek-V3's router in fp32 too. So every
module class whose own parameters are fp32 in a model that also has other dtypes (``fp32_unit_classes``)
gets its own unit: k2quant adds those classes to the config's ``fsdp_transformer_layer_cls_to_wrap``.
"""
from __future__ import annotations

import torch
from torch import nn

from k2quant.errors import K2QuantError

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()  # type: ignore[assignment,misc]


def fp32_unit_classes(*models: nn.Module | None) -> list[str]:
    """Class names of the modules whose own (non-recursive) parameters are all fp32, in models that also hold
    parameters of other dtypes: each needs its own FSDP2 unit (fake-quantized fp32 experts, fp32 routers)."""
    names: list[str] = []
    for model in models:
        if model is None or {p.dtype for p in model.parameters()} <= {torch.float32}:
            continue
        for module in model.modules():
            own = {p.dtype for p in module.parameters(recurse=False)}
            if own == {torch.float32} and type(module).__name__ not in names:
                names.append(type(module).__name__)
    return names


def _add_units(plugin, models: tuple[nn.Module | None, ...]) -> None:
    """Extend a transformer-based auto-wrap policy with the fp32 classes of ``models`` (no-op otherwise)."""
    names = list(plugin.transformer_cls_names_to_wrap or [])
    if not names:  # size-based or no policy: nothing to extend
        return
    extra = [n for n in fp32_unit_classes(*models) if n not in names]
    if extra:
        plugin.transformer_cls_names_to_wrap = names + extra


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def distribute(accelerator, student: nn.Module | None, teacher: nn.Module | None):
    """``(student, teacher)`` placed (and sharded) as the accelerate config says; fake-quant wrappers
    already applied. Either may be None (not there)."""
    if not is_fsdp(accelerator):
        return (accelerator.prepare_model(student) if student is not None else None,
                teacher.to(accelerator.device) if teacher is not None else None)
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise K2QuantError(f"accelerate config: fsdp_version {plugin.fsdp_version}; k2quant qat shards with FSDP2 "
                           f"(per-parameter sharding keeps the fp32 experts apart from the bf16 rest): set "
                           f"fsdp_version: 2, as examples/fsdp.yaml does")
    if accelerator.mixed_precision != "no":
        raise K2QuantError(f"accelerate config: mixed_precision {accelerator.mixed_precision!r}; k2quant qat manages "
                           f"dtypes itself (fp32 expert masters fake-quantized to bf16, so that export writes what was "
                           f"trained) and FSDP's cast would quantize bf16-rounded masters instead: set "
                           f"mixed_precision: \"no\"")
    _add_units(plugin, (student, teacher))
    try:
        teacher = fsdp2_prepare_model(accelerator, teacher) if teacher is not None else None
        student = fsdp2_prepare_model(accelerator, student) if student is not None else None
    except AssertionError as exc:
        if "uniform original parameter dtype" not in str(exc):
            raise
        need = ",".join(fp32_unit_classes(student, teacher))
        raise K2QuantError(f"accelerate config: an FSDP unit holds both fp32 parameters (fake-quantized weights, "
                           f"routers) and bf16 ones ({exc}); use fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP with "
                           f"the decoder layer class in fsdp_transformer_layer_cls_to_wrap, as examples/fsdp.yaml "
                           f"does (k2quant then adds {need} itself)") from None
    return student, teacher


def sum_over(accelerator):
    """A function summing a tensor over all processes (None with one process: nothing to sum)."""
    if accelerator is None or accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A scalar or tensor result that may be a DTensor (e.g. clip_grad_norm_'s total norm), made whole."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def to_local_tree(obj):
    """``obj`` with every DTensor replaced by its local shard (what a rank saves)."""
    if isinstance(obj, DTensor):
        return obj.to_local().clone()
    if isinstance(obj, dict):
        return {k: to_local_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_local_tree(v) for v in obj)
    return obj


def optimizer_state_to_dtensor(opt: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a per-rank state: local shards back into DTensors shaped like their params."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            st = opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.to_local().shape and v.dim():
                    st[k] = DTensor.from_local(v.to(p.to_local().device), p.device_mesh, p.placements,
                                               run_check=False, shape=p.shape, stride=p.stride())
