"""One process of a multi-process ``qat_train.run`` on CPU (gloo), started by torchrun from test_dist.py.

    torchrun --nproc-per-node 2 tests/qat/dist_worker.py CONFIG.json {fsdp|ddp} [RESUME_DIR]

accelerate turns FSDP on only on accelerators (on CPU it stops at MULTI_CPU, i.e. DDP over gloo), so for
``fsdp`` this sets the distributed type to FSDP itself, with a plugin built from ``examples/fsdp.yaml``'s
``fsdp_config``: from there on, sharding is accelerate's own ``fsdp2_prepare_model`` and ``get_state_dict``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from k2quant.qat import config as qat_config
from k2quant.qat import train as qat_train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp.yaml"


def plugin_from_example() -> FullyShardedDataParallelPlugin:
    c = yaml.safe_load(EXAMPLE.read_text())["fsdp_config"]
    return FullyShardedDataParallelPlugin(
        fsdp_version=c["fsdp_version"], auto_wrap_policy=c["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=c["fsdp_transformer_layer_cls_to_wrap"].split(","),
        reshard_after_forward=c["fsdp_reshard_after_forward"], state_dict_type=c["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=c["fsdp_cpu_ram_efficient_loading"])


def main() -> None:
    torch.set_num_threads(1)
    cfg = qat_config.QatConfig(**json.loads(Path(sys.argv[1]).read_text()))
    mode, resume = sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    if mode == "fsdp":
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin_from_example()
    recs = []
    report = qat_train.run(cfg, resume=resume, progress=recs.append, accelerator=accelerator)
    if accelerator.is_main_process:
        (Path(cfg.out) / f"records.{mode}.json").write_text(json.dumps({"records": recs, "steps": report.steps_done,
                                                                       "exported": report.exported}))


if __name__ == "__main__":
    main()
