"""A QAT run's settings (``QatConfig``, saved as ``state/run.json``) and its result (``QatReport``).

Plain Python: the command line reads the choices here without loading torch.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from k2quant.quant.names import INT4_GROUP_SIZE, QAT_INT4_RULE

if TYPE_CHECKING:
    from k2quant.quant.scheme import QuantScheme

LOSSES = ("kl", "ce", "ce+kl")
#: what the optimizer updates: every parameter, or only the fake-quantized weights ("experts": the old name of
#: "targets", from when the targets were always the routed experts)
TRAIN = ("all", "targets", "experts")
#: settings that decide the trained weights: a resume must use the same ones
RESULT_FIELDS = ("src", "data", "steps", "lr", "seq_len", "batch_size", "loss", "scale_rule", "group_size", "targets",
                 "ignore", "train", "warmup", "min_lr_ratio", "clip", "seed", "eval_fraction", "fake_quant", "teacher_topk",
                 "teacher")


@dataclasses.dataclass
class QatConfig:
    """Everything a run needs; saved as ``state/run.json``."""

    src: str
    data: list[str]
    out: str
    steps: int = 2000
    lr: float = 5e-5  # measured on SmolLM2-135M (README, bench/qat_smollm2.py)
    seq_len: int = 4096
    batch_size: int = 8
    loss: str = "kl"
    scale_rule: str = QAT_INT4_RULE
    group_size: int = INT4_GROUP_SIZE
    targets: list[str] | None = None
    ignore: list[str] | None = None
    train: str = "targets"  # only the fake-quantized weights move: INT4 error is theirs to absorb
    warmup: float = 0.1  # share of steps
    min_lr_ratio: float = 0.0
    clip: float = 1.0
    grad_checkpointing: bool = False
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0
    eval_fraction: float = 0.05
    eval_data: list[str] | None = None
    eval_batches: int = 8
    log_every: int = 1
    json_log: str | None = None
    seed: int = 0
    tokenizer: str | None = None
    fake_quant: bool = True  # False: the same run without fake quant (for measurements)
    teacher_topk: int = 64  # >0: the teacher's top-k log-probs computed up front, the teacher model freed; 0: live
    teacher: str | None = None  # the checkpoint distilled from (default: src), e.g. BF16 when src is a GPTQ start
    requantize: bool = False  # accept an INT4 source whose codes the scale rule does not reproduce
    stop_after: int | None = None  # stop (after saving) at this step, as a crash would
    export: bool = True

    def scheme(self) -> QuantScheme:
        from k2quant.quant import scheme  # torch: imported when a run builds its scheme, not by the CLI

        return scheme.for_target("int4", group_size=self.group_size, scale_rule=self.scale_rule,
                                 targets=self.targets, ignore=self.ignore)


@dataclasses.dataclass
class QatReport:
    out: str
    steps_done: int
    seconds: float
    source_format: str
    scale_rule: str
    int4_audit: dict | None
    eval: dict
    exported: bool
