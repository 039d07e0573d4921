"""k2quant: streaming, format-exact quantization for Kimi-K2-class MoE checkpoints."""
__version__ = "0.1.0"
