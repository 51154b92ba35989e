"""The training loop does not make the CPU wait for the device at every step.

A read of a tensor's value on the host (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``,
``.tolist()``, ``.cpu()``) waits for every kernel queued before it on a GPU. On the CPU these
calls are cheap, but they are the same calls, made from the same lines: counting them during a
real run counts the syncs the loop would make on a GPU, without one.
"""

import sys
from contextlib import contextmanager
from pathlib import Path

import accelerate
import pytest
import torch

import synthtune
from synthtune.config import TrainConfig, load_config
from synthtune.train.loop import train

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "train" / "smoke.yaml"
READS = ("item", "tolist", "cpu", "__int__", "__float__", "__bool__", "__index__")
# The loop's own code and the accelerate calls it makes; syncs inside the model (transformers,
# peft) or inside torch (the optimizer reads its CPU step counter) are not the loop's to remove.
LOOP_CODE = (str(Path(synthtune.__file__).parent), str(Path(accelerate.__file__).parent))
# The epoch's sample order is drawn with a CPU torch.Generator: a host tensor on any machine.
HOST_TENSORS = (str(Path(synthtune.__file__).parent / "train" / "data.py"),)


@contextmanager
def host_reads(monkeypatch):
    """Record (method, file:line) for every tensor read on the host called from the loop's code."""
    calls: list[tuple[str, str]] = []

    def wrap(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(LOOP_CODE) and not caller.startswith(HOST_TENSORS):
                calls.append((name, f"{caller}:{sys._getframe(1).f_lineno}"))
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
        yield calls


def _run(tmp_path, steps: int, **overrides) -> None:
    opts = {"output_dir": tmp_path / f"run{steps}", "max_steps": steps, "logging_steps": 2,
            "gradient_accumulation_steps": 2, "eval_data": "null", "eval_steps": 0, "save_steps": 0,
            "trace_memory": "false", "log_with": "none", **overrides}
    train(load_config(TrainConfig, SMOKE, [f"{k}={v}" for k, v in opts.items()]), progress=False)


@pytest.mark.integration  # trains
@pytest.mark.parametrize("overrides", [{}, {"packing": "true", "loss_impl": "chunked"}],
                         ids=["padded-standard", "packed-chunked"])
def test_loop_reads_the_device_once_per_logging_interval(tmp_path, monkeypatch, overrides):
    # Two runs that differ by 4 optimizer steps (8 micro-batches, 2 logging intervals of 2 steps):
    # what setup and the end of the run read cancels out; what is left is per step or per log.
    counts = {}
    for steps in (2, 6):
        with host_reads(monkeypatch) as calls:
            _run(tmp_path, steps, **overrides)
        counts[steps] = calls
    extra = counts[6][len(counts[2]):] if len(counts[6]) > len(counts[2]) else []
    per_site: dict[str, int] = {}
    for name, where in counts[6]:
        per_site[f"{name} at {where}"] = per_site.get(f"{name} at {where}", 0) + 1
    assert len(counts[6]) - len(counts[2]) <= 2, (
        f"{len(counts[6]) - len(counts[2])} host reads for 4 more steps (at most one per logging interval "
        f"allowed): " + "; ".join(f"{k} x{v}" for k, v in sorted(per_site.items())) + f"; extra: {extra[:5]}")
