"""Paths used by synthtune, the notebooks and the scripts.

Nobody should ever edit a path: each one can be moved with an environment variable instead,
e.g. ``SYNTHTUNE_CACHE_DIR=/scratch/cache make demo``. (The 2023 workshop hard-coded a home
directory here, which broke on every machine but one.)

``REPO_ROOT`` is the checkout this package sits in (the usual case: ``make setup`` installs it
editable). Installed from a wheel, the package lives in site-packages, where ``outputs/`` must not
go; then the root is the synthtune checkout the current directory is in (its ``configs/`` and
bundled sample are used), else the current directory itself. ``SYNTHTUNE_ROOT`` overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def _is_checkout(path: Path) -> bool:
    return (path / "pyproject.toml").is_file() and (path / "configs").is_dir() and (path / "synthtune").is_dir()


def _root() -> Path:
    value = os.environ.get("SYNTHTUNE_ROOT")
    if value:
        return Path(value).expanduser().resolve()
    if _is_checkout(_PACKAGE_PARENT):
        return _PACKAGE_PARENT
    cwd = Path.cwd().resolve()
    return next((d for d in (cwd, *cwd.parents) if _is_checkout(d)), cwd)


def _path_from_env(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


REPO_ROOT = _root()
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
