"""Paths used by synthtune, the notebooks and the scripts, all relative to this repo.

Nobody should ever edit a path: each one can be moved with an environment variable instead,
e.g. ``SYNTHTUNE_CACHE_DIR=/scratch/cache make demo``. (The 2023 workshop hard-coded a home
directory here, which broke on every machine but one.)
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent


def _path_from_env(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


#: Data shipped with the project (the bundled GSM8K-format sample lives here).
DATA_DIR = _path_from_env("SYNTHTUNE_DATA_DIR", REPO_ROOT / "data")
BUNDLED_GSM8K_DIR = DATA_DIR / "gsm8k_sample"
#: Everything a run writes: synthesized data, checkpoints, adapters, plots, eval reports.
OUTPUTS_DIR = _path_from_env("SYNTHTUNE_OUTPUTS_DIR", REPO_ROOT / "outputs")
#: Downloaded wheels, converted checkpoints, tiny models and tokenized datasets.
CACHE_DIR = _path_from_env("SYNTHTUNE_CACHE_DIR", REPO_ROOT / ".cache")
MODELS_CACHE_DIR = CACHE_DIR / "models"
CONFIGS_DIR = REPO_ROOT / "configs"

#: The full GSM8K as the original train.jsonl / test.jsonl, when a user has it on disk.
#: Unset means "not on disk": the hub dataset or the bundled sample is used instead.
GSM8K_DIR_ENV = "SYNTHTUNE_GSM8K_DIR"


def gsm8k_dir() -> Path | None:
    value = os.environ.get(GSM8K_DIR_ENV)
    return Path(value).expanduser().resolve() if value else None
