"""``fine_tune/train.py`` for tests/test_multirank_extra.py, with test-only additions, each off
unless its environment variable is set. Everything else is the real entry point and loop.

SYNTHTUNE_TEST_WEIGHTS=FILE
    Right after the model is loaded (and wrapped with LoRA), every rank records how it holds the
    base weights (numel of the local tensor and of its ZeRO-3 partition, per parameter), then all
    ranks gather them and rank 0 writes the full tensors to FILE (safetensors) and the record to
    FILE.json. That is the only way to see what ``deepspeed.zero.Init`` put in the partitions.

SYNTHTUNE_TEST_STATUS_DIR=DIR
    Each rank writes its exit status to DIR/rank-N.

SYNTHTUNE_TEST_FSDP_ON_CPU=1
    accelerate never runs FSDP on CPU processes: ``AcceleratorState`` sets
    ``distributed_type = FSDP`` only inside the branch for accelerator devices
    (accelerate 1.15.0, state.py:984-1013, MULTI_GPU/MLU/SDAA/MUSA/NPU/XPU/HPU/NEURON), and a
    CPU launch is MULTI_CPU (state.py:800-808), so an FSDP launcher config quietly trains as DDP.
    torch's FSDP2 (``fully_shard``) itself runs on CPU over gloo, and so do accelerate's FSDP2
    prepare, save and load once the state says FSDP. This sets it, for the processes of this
    launch only, so the tests can run our loop's FSDP path on a machine without GPUs.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _fsdp_on_cpu() -> None:
    import accelerate.state as st
    from accelerate.utils import DistributedType

    original = st.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # PartialState's shared dict too: every later AcceleratorState() copies it back
            st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    st.AcceleratorState.__init__ = init


def plain_name(name: str) -> str:
    """peft's name of a base weight -> the name in the checkpoint."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _record_weights(path: str) -> None:
    import synthtune.train.loop as loop

    original = loop.load_for_training

    def load(cfg, weights_dtype):
        out = original(cfg, weights_dtype)
        import deepspeed
        import torch.distributed as dist
        from safetensors.torch import save_file

        model = out[0]
        base = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
        held = {plain_name(n): {"local": p.numel(), "partition": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else None,
                                "full": int(getattr(p, "ds_numel", p.numel()))} for n, p in base}
        rank = dist.get_rank() if dist.is_initialized() else 0
        with deepspeed.zero.GatheredParameters([p for _, p in base], modifier_rank=None):
            if rank == 0:
                save_file({plain_name(n): p.detach().clone().contiguous() for n, p in base}, path)
        records = [None] * dist.get_world_size() if dist.is_initialized() else None
        if records is not None:
            dist.all_gather_object(records, held)
        if rank == 0:
            Path(path + ".json").write_text(json.dumps(records or [held]))
        return out

    loop.load_for_training = load


if __name__ == "__main__":
    if os.environ.get("SYNTHTUNE_TEST_FSDP_ON_CPU") == "1":
        _fsdp_on_cpu()
    if os.environ.get("SYNTHTUNE_TEST_WEIGHTS"):
        _record_weights(os.environ["SYNTHTUNE_TEST_WEIGHTS"])
    sys.argv = [str(REPO / "fine_tune" / "train.py"), *sys.argv[1:]]
    status_dir = os.environ.get("SYNTHTUNE_TEST_STATUS_DIR")
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as done:
        # SYNTHTUNE_TEST_STATUS_DIR=DIR: each rank writes its exit status to DIR/rank-N; a
        # launcher reports only its own (torchrun's), and only for workers that failed
        if status_dir:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            (Path(status_dir) / f"rank-{os.environ.get('RANK', '0')}").write_text(str(code))
        raise
