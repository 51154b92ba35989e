"""`synthtune models prepare NAME` and `synthtune models info NAME`."""

from __future__ import annotations

from synthtune.config import ModelsInfoConfig, ModelsPrepareConfig
from synthtune.models import model_info, resolve_model


def prepare(cfg: ModelsPrepareConfig) -> str:
    """Fetch, convert or build the model once (before going offline, say); returns its local path."""
    return resolve_model(cfg.name, seed=cfg.seed)


def info(cfg: ModelsInfoConfig) -> dict:
    """Kind (causal or seq2seq), size and the dtype/device it would load with; no weights are loaded."""
    return model_info(cfg.name, trust_remote_code=cfg.trust_remote_code)
