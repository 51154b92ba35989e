"""What a bug report needs: versions, the accelerator, paths, and the installed packages against ``poetry.lock``.

``make setup`` installs exactly what ``poetry.lock`` pins, so "works here, fails there" is most
often a package that drifted from its pin (a manual ``pip install -U``, an old ``.venv``).
:func:`lock_mismatches` names each one and what to run; :func:`report` gathers everything
``synthtune env`` prints.

Only the standard library and ``packaging`` load with this module; torch and DeepSpeed are
imported inside :func:`report`. Versions of the other libraries come from their installed
metadata, so nothing is imported just to read a version.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from packaging.markers import InvalidMarker, Marker, UndefinedComparison, UndefinedEnvironmentName
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from synthtune import __version__, models, paths
from synthtune.errors import ConfigError

PROJECT = "synthtune"
#: installed by the virtualenv itself or by pip, never pinned in the lock
NEVER_LOCKED = frozenset({PROJECT, "pip", "setuptools", "wheel"})
FIX_PIN = "run `make setup` to reinstall from the lock, or `make lock` after changing pins in pyproject.toml"
NO_LOCK = "no poetry.lock beside this install"
#: the libraries a report lists by version (None when not installed)
LIBRARIES = ("transformers", "peft", "accelerate", "deepspeed", "datasets")


def _load_toml(text: str, where: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomllib arrived in 3.11
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"reading {where} needs a TOML parser: Python 3.11+ has tomllib; on 3.10 "
                              f"install tomli (`pip install tomli`)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where} is not valid TOML ({err}); restore it with `git checkout poetry.lock`") from None


def _applies(marker: str | Mapping[str, str] | None, extras: Iterable[str],
             environment: Mapping[str, str] | None) -> bool:
    """Whether a lock entry's ``markers`` hold here, with any of the lock's extras installed.

    Poetry writes the dev dependencies as ``extra == "dev"``; whether that extra was installed is
    not recorded anywhere, so an entry counts if it holds with no extra or with any of them. A
    lock with dependency groups may store one marker per group (a table): any of them will do.
    """
    if not marker:
        return True
    if isinstance(marker, Mapping):
        return any(_applies(m, extras, environment) for m in marker.values())
    try:
        parsed = Marker(marker)
    except InvalidMarker:
        return True  # a marker newer than this packaging: keep the pin rather than hide it
    for extra in ("", *extras):
        env = dict(environment or {})
        env["extra"] = extra
        try:
            if parsed.evaluate(env):
                return True
        except (UndefinedComparison, UndefinedEnvironmentName):
            return True
    return False


def locked_pins(lock: str | Mapping[str, Any], environment: Mapping[str, str] | None = None,
                where: str = "poetry.lock") -> dict[str, tuple[str, ...]]:
    """PEP 503 name -> the versions ``lock`` pins for this interpreter and platform.

    ``lock`` is the lock file's text or its parsed TOML. ``environment`` overrides marker variables
    (``python_version``, ``sys_platform``, ...) as :meth:`packaging.markers.Marker.evaluate` takes them.
    A name has several versions when the lock holds several entries whose markers all hold (e.g. a
    CUDA library that torch and another package pin differently for different platforms).
    """
    data = _load_toml(lock, where) if isinstance(lock, str) else lock
    extras = tuple((data.get("extras") or {}).keys())
    pins: dict[str, list[str]] = {}
    for entry in data.get("package", []):
        if not isinstance(entry, Mapping) or "name" not in entry or "version" not in entry:
            continue
        if _applies(entry.get("markers"), extras, environment):
            versions = pins.setdefault(canonicalize_name(entry["name"]), [])
            if entry["version"] not in versions:
                versions.append(str(entry["version"]))
    return {name: tuple(versions) for name, versions in sorted(pins.items())}


def locked_versions(lock_path: str | Path) -> dict[str, str]:
    """PEP 503 name -> version pinned in ``poetry.lock`` for this interpreter and platform.

    Where the lock pins one name at several versions that all apply here, the value lists them:
    ``"13.1.1.3 or 13.10.0.20"`` (:func:`locked_pins` keeps them apart).
    """
    path = Path(lock_path)
    pins = locked_pins(path.read_text(encoding="utf-8"), where=str(path))
    return {name: " or ".join(versions) for name, versions in pins.items()}


def installed_versions() -> dict[str, str]:
    """PEP 503 name -> version of every distribution this interpreter imports (the first on ``sys.path`` wins)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        # setuptools puts its vendored copies on sys.path once it is imported (DeepSpeed's op probe
        # does); they are setuptools' private files, not packages of this environment
        if name and "_vendor" not in Path(str(dist.locate_file(""))).parts:
            found.setdefault(canonicalize_name(name), dist.version)
    return dict(sorted(found.items()))


def _public(version: str) -> str:
    """The version without its local label: torch's ``2.5.1+cpu`` is the lock's ``2.5.1``."""
    try:
        return Version(version).public
    except InvalidVersion:
        return version.split("+", 1)[0]


def _same(installed: str, locked: str) -> bool:
    try:
        return Version(_public(installed)) == Version(_public(locked))
    except InvalidVersion:
        return _public(installed) == _public(locked)


def compare_with_lock(pins: Mapping[str, Iterable[str]], installed: Mapping[str, str]) -> list[str]:
    """The mismatch lines for ``installed`` (name -> version) against ``pins`` (name -> allowed versions).

    Pure: :func:`lock_mismatches` feeds it the real lock and environment, tests feed it their own.
    Packages pinned but not installed are fine (the lock covers every platform: nvidia-* for CUDA torch).
    """
    pins = {canonicalize_name(k): tuple(v) for k, v in pins.items()}
    lines = []
    for raw_name, version in sorted(installed.items()):
        name = canonicalize_name(raw_name)
        if name in NEVER_LOCKED:
            continue
        allowed = pins.get(name)
        if allowed is None:
            lines.append(f"{name}: installed {version}, lock none (not in poetry.lock); run `pip uninstall {name}`, "
                         f"or add it to pyproject.toml and run `make lock`")
        elif not any(_same(version, pin) for pin in allowed):
            lines.append(f"{name}: installed {version}, lock {' or '.join(allowed)}; {FIX_PIN}")
    return lines


def lock_mismatches(lock_path: str | Path, installed: Mapping[str, str] | None = None) -> list[str]:
    """One line per installed package whose version is not the lock's, or that the lock lacks; [] when in step."""
    path = Path(lock_path)
    pins = locked_pins(path.read_text(encoding="utf-8"), where=str(path))
    return compare_with_lock(pins, installed_versions() if installed is None else installed)


# ---------------------------------------------------------------- the report


def _version_of(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_report() -> dict[str, Any]:
    """torch's version, backend (CUDA x.y, ROCm x.y or CPU), whether CUDA runs here, and each GPU."""
    try:
        import torch
    except ImportError:
        return {"version": None, "backend": None, "cuda_available": False, "gpus": []}
    if torch.version.hip:  # ROCm builds answer through torch.cuda too
        backend = f"ROCm {torch.version.hip}"
    elif torch.version.cuda:
        backend = f"CUDA {torch.version.cuda}"
    else:
        backend = "CPU"
    available = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if available else 0):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "compute_capability": f"{props.major}.{props.minor}"})
    return {"version": torch.__version__, "backend": backend, "cuda_available": available, "gpus": gpus}


def deepspeed_ops() -> dict[str, Any] | str:
    """Which DeepSpeed ops are prebuilt and which this machine could JIT-build, as ``ds_report`` says.

    DeepSpeed's own probe (``deepspeed.ops.__compatible_ops__``) checks each op's requirements
    (CUDA version, headers, libaio); it builds no op. A string says why the ops are unknown.
    """
    try:
        import deepspeed.ops
        from deepspeed.git_version_info import installed_ops
    except Exception as err:  # a broken DeepSpeed install is itself what the report must show
        return f"unknown ({type(err).__name__}: {err})"
    try:
        compatible = dict(deepspeed.ops.__compatible_ops__)
    except Exception as err:
        return f"unknown ({type(err).__name__}: {err})"
    compatible.pop("deepspeed_not_implemented", None)
    return {"compatible": sorted(op for op, ok in compatible.items() if ok),
            "prebuilt": sorted(op for op, ok in installed_ops.items() if ok)}


def lock_status(root: Path | None = None, installed: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``matches_lock`` and ``lock_mismatches`` for the ``poetry.lock`` in ``root`` (the project root).

    Without a readable lock, ``matches_lock`` is None and ``lock_mismatches`` says why, in words.
    """
    lock = (root or paths.REPO_ROOT) / "poetry.lock"
    if not lock.is_file():
        return {"lock": None, "matches_lock": None, "lock_mismatches": NO_LOCK}
    try:
        lines = lock_mismatches(lock, installed)
    except (ConfigError, OSError) as err:  # the report still prints everything else
        return {"lock": str(lock), "matches_lock": None, "lock_mismatches": f"could not read the lock: {err}"}
    return {"lock": str(lock), "matches_lock": not lines, "lock_mismatches": lines}


def report() -> dict[str, Any]:
    """Everything a bug report needs, JSON-serializable. Downloads, converts and builds nothing."""
    lock = lock_status()  # first: importing torch and DeepSpeed can add paths to sys.path
    torch_info = torch_report()
    libraries: dict[str, Any] = {name: _version_of(name) for name in LIBRARIES}
    ds_ops = deepspeed_ops() if libraries["deepspeed"] else None
    gsm8k = paths.gsm8k_dir()
    embedded = models.converted_embedded_model()
    return {
        "synthtune": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch_info["version"],
        "torch_backend": torch_info["backend"],
        "cuda_available": torch_info["cuda_available"],
        "gpus": torch_info["gpus"],
        **libraries,
        "deepspeed_ops": ds_ops,
        **lock,
        "repo_root": str(paths.REPO_ROOT),
        "cache_dir": str(paths.CACHE_DIR),
        "outputs_dir": str(paths.OUTPUTS_DIR),
        "models_cache_dir": str(paths.MODELS_CACHE_DIR),
        "gsm8k_dir": None if gsm8k is None else str(gsm8k),
        "embedded_model": models.EMBEDDED_MODEL,
        "embedded_model_converted": embedded is not None,
        "embedded_model_dir": None if embedded is None else str(embedded),
    }
