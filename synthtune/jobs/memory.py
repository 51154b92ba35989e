"""`synthtune memory`: peak GPU memory per GPU for a training setup, or ``--fit`` the fastest that fits.

    synthtune memory --model configs/models/flan-ul2/config.json --fit --gpu-gib 40 --gpus 4
"""

from __future__ import annotations

from dataclasses import fields

from synthtune.config import MemoryConfig
from synthtune.errors import ConfigError
from synthtune.memory.estimate import Setup, estimate
from synthtune.memory.fit import fit
from synthtune.memory.report import estimate_json, print_estimate, print_fit
from synthtune.memory.shape import load_shape


def setup_of(cfg: MemoryConfig) -> Setup:
    """The estimator's Setup from the command's config (the fields they share), checked."""
    setup = Setup(**{f.name: getattr(cfg, f.name) for f in fields(Setup)})
    try:
        setup.check()
    except ValueError as err:  # combinations no single field's range can express (offload needs ZeRO)
        raise ConfigError(f"memory: {err}") from None
    return setup


def run(cfg: MemoryConfig, console=None) -> dict:
    """The estimate (or, with ``cfg.fit``, the search result) as JSON; printed for people on ``console``."""
    setup = setup_of(cfg)
    shape = load_shape(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.fit:
        result = fit(shape, setup, cfg.gpu_gib, headroom=cfg.headroom, cpu_gib=cfg.cpu_gib,
                     global_batch=cfg.global_batch, train_config=cfg.train_config)
        if console is not None:
            print_fit(result, console)
        return result
    est = estimate(shape, setup)
    if console is not None:
        print_estimate(est, console)
    return estimate_json(est)
