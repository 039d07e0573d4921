"""Evaluation: degradation of quantized checkpoints against a baseline (lm-eval + direct measures) and
streaming weight diffs.

- ``harness``  the lm-eval adapter (``Harness``, ``EvalSettings``; backends hf / vllm / api)
- ``measures`` KL(baseline || candidate), same-top-1, PPL ratio from full next-token distributions
- ``report``   recovery, paired standard errors, flips, ``results.json``
- ``compare``  ``evaluate(baseline, candidates, settings, out_dir)``: the whole ``k2quant eval`` run
- ``diff``     per-tensor error between two checkpoints in any formats, without a forward pass
- ``plot``     the PNG of a diff: SQNR / relative error per layer and tensor class
- ``tasks/``   the offline lm-eval tasks (YAML) and the builders of their documents
"""
