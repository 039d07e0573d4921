"""The names of k2quant's formats, schemes and rules: what users pass on the command line and configs hold.

Plain Python (no torch), so that the command line can offer them as choices without loading the numeric
stack. ``quant.scheme`` builds the schemes from these; nothing else spells them.
"""
from __future__ import annotations

#: checkpoint formats, and convert's ``--to`` targets
FORMATS: tuple[str, ...] = ("bf16", "fp8", "int4")

#: scheme dtypes
FP8 = "fp8_e4m3"
INT4 = "int4"

FP8_BLOCK: tuple[int, int] = (128, 128)  # DeepSeek/Kimi's tile: one fp32 scale per 128x128
INT4_GROUP_SIZE = 32  # K2-Thinking's group along the input dim

#: scale rules per dtype
#: - fp8 deepseek: amax/448 per tile, fp32 (DeepSeek-V3's own)
#: - int4 library: amax/7.5 in bf16, codes [-8, 7] (compressed-tensors 0.20 on CPU)
#: - int4 kimi:    bf16(fp32(amax)/7), codes [-7, 7] (K2-Thinking's convention, idempotent)
SCALE_RULES: dict[str, tuple[str, ...]] = {FP8: ("deepseek",), INT4: ("library", "kimi")}
INT4_RULES: tuple[str, ...] = SCALE_RULES[INT4]
#: convert writes what compressed-tensors itself would compute; qat trains on K2-Thinking's own rule
CONVERT_INT4_RULE = "library"
QAT_INT4_RULE = "kimi"

#: Kimi-K2-Thinking's ignore list, written verbatim into INT4 configs.
KIMI_INT4_IGNORE: tuple[str, ...] = (
    "lm_head",
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
)
#: The routed experts, as module names (no ``.weight``).
ROUTED_EXPERTS = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"

#: INT4 methods: rtn = round to nearest; gptq = calibrated one decoder layer at a time (formats.calibrate)
METHODS: tuple[str, ...] = ("rtn", "gptq")
CALIB_SAMPLES, CALIB_SEQ_LEN = 64, 256  # calibration sequences and their length, by default

#: kernel choices: fast = compiled CPU kernels (numba), reference = pure torch (any device)
KERNELS: tuple[str, ...] = ("auto", "fast", "reference")

#: --recipe: named selections, resolved on each model's own architecture (formats.selection)
RECIPES: dict[str, str] = {
    "experts": "routed experts only (the K2-Thinking layout; what --to int4 does by default)",
    "linear": "every Linear but lm_head (attention, MLPs, shared and routed experts)",
    "mlp": "MLPs and experts only: dense MLPs, shared and routed experts; attention and lm_head stay BF16",
}
