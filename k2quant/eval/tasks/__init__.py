"""Offline lm-eval task definitions shipped with k2quant (YAML + the document builders in ``sources``)."""
