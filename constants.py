"""The workshop's paths file, kept under its old name for notebooks and scripts run from this checkout.

The paths themselves live in :mod:`synthtune.paths` (the package never imports this file, so an
installed synthtune adds no top-level ``constants`` module that could shadow another package's).
"""

from synthtune.paths import (  # noqa: F401
    BUNDLED_GSM8K_DIR,
    CACHE_DIR,
    CONFIGS_DIR,
    DATA_DIR,
    GSM8K_DIR_ENV,
    MODELS_CACHE_DIR,
    OUTPUTS_DIR,
    REPO_ROOT,
    gsm8k_dir,
)
