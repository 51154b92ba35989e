"""`synthtune env` and synthtune.environment: the bug-report facts and the installed packages against poetry.lock."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from synthtune import environment as E
from synthtune.config import EnvConfig
from synthtune.errors import ConfigError
from synthtune.jobs import env as job

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "poetry.lock"
LINUX_311 = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}

KEYS = {"synthtune", "python", "platform", "torch", "torch_backend", "cuda_available", "gpus", "transformers", "peft",
        "accelerate", "deepspeed", "deepspeed_ops", "datasets", "lock", "matches_lock", "lock_mismatches", "repo_root",
        "cache_dir", "outputs_dir", "models_cache_dir", "gsm8k_dir", "embedded_model", "embedded_model_converted",
        "embedded_model_dir"}

# the shape poetry 2 writes: per-entry markers, dev dependencies as an extra
SYNTHETIC_LOCK = '''
[[package]]
name = "Foo_Bar"
version = "1.0"
groups = ["main"]

[[package]]
name = "numpy"
version = "2.2.6"
groups = ["main"]
markers = "python_version == \\"3.10\\""

[[package]]
name = "numpy"
version = "2.4.6"
groups = ["main"]
markers = "python_version >= \\"3.11\\""

[[package]]
name = "pytest"
version = "8.0"
groups = ["main"]
markers = "extra == \\"dev\\""

[[package]]
name = "pywin32"
version = "311"
groups = ["main"]
markers = "platform_system == \\"Windows\\""

[[package]]
name = "ruff"
version = "0.6"
groups = ["dev", "docs"]
markers = {dev = "platform_system == \\"Windows\\"", docs = "python_version >= \\"3.11\\""}

[extras]
dev = ["pytest"]
'''


# ---------------------------------------------------------------- the pure comparison


def test_a_changed_pin_is_reported_with_the_fix():
    lines = E.compare_with_lock({"numpy": ("2.4.6",)}, {"numpy": "2.3.0"})
    assert len(lines) == 1
    assert lines[0].startswith("numpy: installed 2.3.0, lock 2.4.6")
    assert lines[0].endswith(E.FIX_PIN) and "make setup" in lines[0] and "make lock" in lines[0]


def test_a_local_version_label_is_not_a_mismatch():
    assert E.compare_with_lock({"torch": ("2.5.1",)}, {"torch": "2.5.1+cpu"}) == []
    assert E.compare_with_lock({"torch": ("2.5.1",)}, {"torch": "2.5.1+cu124"}) == []
    # the public version still counts
    assert E.compare_with_lock({"torch": ("2.5.1",)}, {"torch": "2.5.0+cpu"}) != []


def test_packages_only_in_the_lock_are_fine():
    pins = {"torch": ("2.5.1",), "nvidia-cublas-cu12": ("12.4.5.8",), "triton": ("3.1.0",)}
    assert E.compare_with_lock(pins, {"torch": "2.5.1+cpu"}) == []


def test_an_installed_package_the_lock_lacks_is_reported():
    lines = E.compare_with_lock({"torch": ("2.5.1",)}, {"torch": "2.5.1", "Left_Over": "0.3"})
    assert len(lines) == 1
    assert lines[0].startswith("left-over: installed 0.3, lock none")
    assert "pip uninstall left-over" in lines[0] and "make lock" in lines[0]


def test_the_project_and_the_installers_are_never_reported():
    installed = {"synthtune": "0.1.0", "pip": "24.0", "setuptools": "70.0", "wheel": "0.43"}
    assert E.compare_with_lock({}, installed) == []


def test_names_compare_after_pep503_normalization_and_any_applicable_pin_matches():
    assert E.compare_with_lock({"Foo_Bar": ("1.0",)}, {"foo.bar": "1.0"}) == []
    assert E.compare_with_lock({"nvidia-cublas": ("13.1.1.3", "13.10.0.20")}, {"nvidia-cublas": "13.10.0.20"}) == []
    [line] = E.compare_with_lock({"nvidia-cublas": ("13.1.1.3", "13.10.0.20")}, {"nvidia-cublas": "13.2"})
    assert "lock 13.1.1.3 or 13.10.0.20" in line


# ---------------------------------------------------------------- reading the lock


def test_lock_markers_pick_the_pins_for_this_interpreter_and_platform():
    pins = E.locked_pins(SYNTHETIC_LOCK, LINUX_311)
    assert pins == {"foo-bar": ("1.0",), "numpy": ("2.4.6",), "pytest": ("8.0",), "ruff": ("0.6",)}  # no pywin32
    on_310 = E.locked_pins(SYNTHETIC_LOCK, {**LINUX_311, "python_version": "3.10"})
    assert on_310["numpy"] == ("2.2.6",) and "ruff" not in on_310  # neither group's marker holds
    assert "pywin32" in E.locked_pins(SYNTHETIC_LOCK, {**LINUX_311, "platform_system": "Windows"})


def test_lock_mismatches_reads_a_lock_file(tmp_path):
    lock = tmp_path / "poetry.lock"
    lock.write_text(SYNTHETIC_LOCK)
    installed = {"numpy": "2.2.6" if sys.version_info < (3, 11) else "2.4.6", "foo-bar": "1.0"}
    assert E.lock_mismatches(lock, installed) == []
    [line] = E.lock_mismatches(lock, {**installed, "foo-bar": "1.1"})
    assert line.startswith("foo-bar: installed 1.1, lock 1.0")


def test_a_broken_lock_says_where_and_how_to_fix(tmp_path):
    lock = tmp_path / "poetry.lock"
    lock.write_text("[[package]\nname = ")
    with pytest.raises(ConfigError, match=r"poetry\.lock is not valid TOML.*line 1.*git checkout poetry\.lock"):
        E.lock_mismatches(lock, {})
    # the report still prints everything else, and says why the lock was not compared
    status = E.lock_status(tmp_path, {})
    assert status["matches_lock"] is None and "is not valid TOML" in status["lock_mismatches"]


def test_the_real_lock_pins_the_stack():
    pinned = E.locked_versions(LOCK)
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "packaging"):
        assert pinned.get(name), f"{name} is not pinned in poetry.lock"
    # the lock pins transformers per Python version: its markers choose one
    by_python = {v: E.locked_pins(LOCK.read_text(), {**LINUX_311, "python_version": v})["transformers"]
                 for v in ("3.10", "3.11")}
    assert all(len(pins) == 1 for pins in by_python.values()) and by_python["3.10"] != by_python["3.11"]


def test_installed_versions_skip_vendored_copies(tmp_path, monkeypatch):
    # setuptools puts its _vendor folder on sys.path once imported; those are not the environment's packages
    for folder, name in ((tmp_path / "site", "st-real-dist"), (tmp_path / "tool" / "_vendor", "st-vendored-dist")):
        info = folder / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        monkeypatch.syspath_prepend(str(folder))
    installed = E.installed_versions()
    assert installed["st-real-dist"] == "1.0" and "st-vendored-dist" not in installed
    assert installed["torch"] and installed["packaging"]


# ---------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def report() -> dict:
    return E.report()


def test_report_has_every_key_and_serializes(report):
    assert set(report) == KEYS
    assert json.loads(json.dumps(report)) == report
    assert report["torch"] and report["torch_backend"].split()[0] in ("CPU", "CUDA", "ROCm")
    assert isinstance(report["gpus"], list) and (report["gpus"] == []) == (not report["cuda_available"])
    assert report["python"].startswith(".".join(map(str, sys.version_info[:2])))
    # the checkout has a lock, so the report compares with it, and the verdict matches the lines
    assert report["lock"] == str(LOCK)
    assert report["matches_lock"] == (report["lock_mismatches"] == [])
    assert report["lock_mismatches"] == E.lock_mismatches(LOCK)
    ops = report["deepspeed_ops"]
    assert isinstance(ops, str) or set(ops) == {"compatible", "prebuilt"}


def test_no_lock_beside_the_install_is_said(tmp_path):
    assert E.lock_status(tmp_path, {}) == {"lock": None, "matches_lock": None, "lock_mismatches": E.NO_LOCK}


def test_the_embedded_model_check_only_looks(tmp_path):
    from synthtune.models import EMBEDDED_MODEL, converted_embedded_model

    assert converted_embedded_model(tmp_path) is None
    assert not (tmp_path / EMBEDDED_MODEL).exists()  # looking created nothing


def test_the_human_listing_shows_a_mismatch(report):
    console = Console(record=True, width=200, file=io.StringIO())
    bad = {**report, "matches_lock": False, "lock_mismatches": ["torch: installed 2.0, lock 2.1; run it"]}
    console.print(job.table(bad))
    text = console.export_text()
    assert "NO: 1 package(s) differ from poetry.lock" in text and "torch: installed 2.0, lock 2.1" in text
    assert job.run(EnvConfig()).keys() == KEYS


def test_env_takes_no_keys_and_says_so():
    from synthtune.config import load_config

    with pytest.raises(ConfigError, match=r"unknown key 'foo' for EnvConfig\. It takes no keys\."):
        load_config(EnvConfig, None, ["foo=1"])


def test_synthtune_env_json(synthtune_bin):
    proc = subprocess.run([synthtune_bin, "env", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == KEYS
    assert result["repo_root"] == str(REPO) and result["lock"] == str(LOCK)
