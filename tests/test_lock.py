"""The lock is what installs: the venv holds poetry.lock's versions, and torch has one version everywhere.

These run in `make test` on the venv `make setup` built, so a venv that drifted from the lock (a pin
edited by hand, a package installed on the side) fails CI with what to run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from synthtune.environment import lock_mismatches, locked_versions

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "poetry.lock"
CONSTRAINTS = REPO / "constraints.txt"
IN_PROJECT_VENV = Path(sys.prefix).resolve() == (REPO / ".venv").resolve()


def _constraints() -> dict[str, list[Requirement]]:
    out: dict[str, list[Requirement]] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            out.setdefault(req.name, []).append(req)
    return out


@pytest.mark.skipif(not IN_PROJECT_VENV, reason="checks the venv `make setup` built (.venv/), not this interpreter")
def test_the_venv_holds_exactly_the_locked_versions():
    problems = lock_mismatches(LOCK)
    assert problems == [], "the venv differs from poetry.lock:\n" + "\n".join(problems)


def test_torch_has_one_version_in_the_lock_the_constraints_and_the_makefile():
    locked = locked_versions(LOCK)["torch"]
    (torch_pin,) = _constraints()["torch"]
    assert str(torch_pin.specifier) == f"=={locked}"
    # the Makefile reads TORCH_SPEC from constraints.txt rather than writing a version of its own
    spec = subprocess.run(["make", "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", "print-torch"],
                          input="print-torch:\n\t@echo $(TORCH_SPEC)\n", capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert spec.stdout.strip() == f"torch=={locked}", spec.stderr
    assert not re.search(r"^TORCH_SPEC\s*\??=\s*torch==", (REPO / "Makefile").read_text(), re.M)
    # the docs name the same version
    for doc in (REPO / "docs" / "README.md",):
        for found in re.findall(r"torch(?:==| )(\d+\.\d+\.\d+)", doc.read_text()):
            assert found == locked, f"{doc.name} names torch {found}; the lock pins {locked}"
    import torch

    assert Version(torch.__version__).public == locked or not IN_PROJECT_VENV


def test_constraints_pin_every_locked_package_but_torchs_cuda_runtime():
    pins = _constraints()
    names = set(re.findall(r'^name = "([^"]+)"', LOCK.read_text(), re.M))
    # the Makefile's CUDA_RUNTIME: torch's own CUDA wheels (nvitop's nvidia-ml-py is no part of them)
    cuda_runtime = {n for n in names if n.startswith(("nvidia-cu", "nvidia-nccl", "nvidia-nvjitlink",
                                                      "nvidia-nvshmem", "nvidia-nvtx", "cuda-")) or n == "triton"}
    assert "nvidia-ml-py" in names - cuda_runtime
    assert set(pins) == names - cuda_runtime
    assert all(str(r.specifier).startswith("==") for rs in pins.values() for r in rs)


@pytest.mark.skipif(not IN_PROJECT_VENV, reason="checks the venv `make setup` built (.venv/), not this interpreter")
def test_setup_installed_every_pin_but_torch_in_hash_checking_mode():
    # make setup installs .venv/locked-requirements.txt with --require-hashes: every package the lock
    # pins, each with its hashes, except torch (the CPU wheel is another file) and its CUDA runtime
    text = (REPO / ".venv" / "locked-requirements.txt").read_text().replace("\\\n", " ")
    entries = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    names = {Requirement(line.split(" --hash")[0]).name for line in entries}
    assert all("--hash=sha256:" in line for line in entries)
    assert names == set(_constraints()) - {"torch"}
