"""Shared fixtures: tiny models are built once per session (seconds, no network)."""

from __future__ import annotations

import getpass
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# `make test` is the gate CI runs, so its property tests draw the same examples every time
# (`--hypothesis-profile=gate`): a gate that fails at random blocks work that broke nothing.
# Everywhere else (`make test-fast`, plain pytest, `make fuzz`) they draw fresh examples, which is
# how they keep finding inputs nobody thought of; a failure prints the blob that replays it.
settings.register_profile("gate", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", print_blob=True)

REPO = Path(__file__).resolve().parents[1]
# The CLI under test is the one `make` installed next to this interpreter.
SYNTHTUNE = str(Path(sys.executable).parent / "synthtune")


@pytest.fixture(scope="session", autouse=True)
def _temp_dir_under_basetemp(tmp_path_factory):
    """The suite's temporary files, and its subprocesses', go under pytest's basetemp, which pytest
    prunes (it keeps the last three runs). Left in the system's temp dir, every run added a
    ``torchelastic_*`` log dir per launched rank (torchrun never removes them) and the mkdtemp
    directories of session-long fixtures."""
    # torch's compile cache defaults to the temp dir too: keep it where it was, or every run would
    # compile flex attention again
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's arbitrary uid with no name: torch's own fallback
        user = f"uid_{os.getuid()}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{user}"))
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp", numbered=False))
    tempfile.tempdir = None  # recomputed from TMPDIR on next use
    yield
    if saved is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def tiny_llama():
    from synthtune.models import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def tiny_t5():
    from synthtune.models import load_model

    return load_model("tiny-t5", device="cpu")


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The full GSM8K when this machine has it (make exports SYNTHTUNE_GSM8K_DIR), else skip."""
    value = os.environ.get("SYNTHTUNE_GSM8K_DIR")
    path = Path(value) if value else REPO.parent / "shared" / "data" / "gsm8k"
    if not (path / "train.jsonl").exists():
        pytest.skip("full GSM8K not on this machine (set SYNTHTUNE_GSM8K_DIR to use it)")
    return path


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


@pytest.fixture
def synthtune_bin() -> str:
    if not shutil.which(SYNTHTUNE):
        pytest.fail(f"{SYNTHTUNE} is missing: run the tests through `make test`, which installs it")
    return SYNTHTUNE


def pytest_collection_modifyitems(items):
    # Anything that runs the installed console script spawns a process: the integration tier.
    for item in items:
        if "synthtune_bin" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
    _heavy_modules_first(items)


def _heavy_modules_first(items) -> None:
    """Whole modules in order of their share of integration tests, the heaviest first.

    `--dist worksteal` gives each worker one half of this list: one starts on the launches, the
    other on the unit tests, and whichever runs dry takes the back half of the other's queue. So
    both workers end on short tests, instead of one finishing a launch-heavy file while the other
    idles. Modules stay contiguous (a module fixture is built again only where a steal splits its
    module) and keep their own order; the sort is stable and the same on every worker, as xdist
    requires.
    """
    counts: dict[str, list[int]] = {}
    for item in items:
        c = counts.setdefault(item.nodeid.split("::")[0], [0, 0])
        c[0] += item.get_closest_marker("integration") is not None
        c[1] += 1
    share = {module: heavy / total for module, (heavy, total) in counts.items()}
    items.sort(key=lambda item: -share[item.nodeid.split("::")[0]])
