"""Launching real multi-process training runs from tests: free ports, a timeout, summaries.

Every launch goes through ``accelerate launch ... fine_tune/train.py``, the command users run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "train" / "smoke.yaml"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
ZERO3_2PROC_CPU = ACCELERATE_CONFIGS / "zero3_2proc_cpu.yaml"
# A hang (a collective one rank never joins) fails the test after this, never stalls CI.
LAUNCH_TIMEOUT_S = 300


def free_port() -> int:
    """A port nothing listens on now: concurrent runs (other tests, other jobs) never share 29500."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*overrides: str, config_file: Path = ZERO3_2PROC_CPU, launch_args: tuple[str, ...] = (),
           timeout: int = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``accelerate launch`` the smoke recipe with ``overrides``; fails with the output's tail."""
    cmd = [ACCELERATE, "launch", "--config_file", str(config_file), "--main_process_port", str(free_port()),
           *launch_args, str(REPO / "fine_tune" / "train.py"), "--config", str(SMOKE), *overrides]
    # one thread per process: 2 ranks on 2 cores, and no oversubscription when they all-gather
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own: on a timeout the whole tree goes (the launcher and both ranks), or
    # a hung rank would keep spinning after the test failed.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} ran over {timeout} s (a hang?):\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def without_dropout(model: str, dest: Path) -> Path:
    """A copy of a built-in model with dropout off (config only, same weights).

    Dropout masks come from each process's own RNG, so 2 ranks and 1 process can only agree to
    float precision on a model without dropout (tiny-t5 has T5's default 0.1; tiny-llama none).
    """
    import shutil

    from synthtune.models import resolve_model

    shutil.copytree(resolve_model(model), dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update({k: 0.0 for k in cfg if "dropout" in k and isinstance(cfg[k], float)})
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


def logged(s: dict, key: str) -> dict[int, float]:
    """``{step: value}`` of a key in a run's history (train records: loss, lr)."""
    return {h["step"]: h[key] for h in s["history"] if key in h}


def expected_lrs(steps: int, *overrides: str) -> list[float]:
    """The smoke recipe's learning rate after each optimizer step, from its own schedule on one process."""
    import torch
    from transformers import get_scheduler

    from synthtune.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, SMOKE, list(overrides))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs
