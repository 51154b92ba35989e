"""Benchmark: what `pip install synthtune` costs with and without the `zero` and `tracking` extras.

Run (repo root; builds one throw-away venv, a few minutes, needs the package index):

    .venv/bin/python bench/install_bench.py --out bench/results/install_bench_cpu.json

Until the dependency audit (issue #15) DeepSpeed and TensorBoard were core dependencies; they are
now the `zero` and `tracking` extras. So the old install is exactly `synthtune[zero,tracking]`, and
both sides come from one run on one machine: two fresh venvs get torch (the lock's version, as
`make setup` installs it) and then, through `constraints.txt` (the lock's pins), `.` (the core: the
**after** side) or `.[zero,tracking]` (the **before** side).

Each side records the venv's size (all of it, and without torch and its CUDA runtime, which both
sides share and which dwarfs the rest), the number of installed distributions, and the wall time
of `python -c "import synthtune"`, `synthtune --help` and `import synthtune.train.loop` (the
import behind every training run): the median of --repeats fresh interpreters each, minus a bare
interpreter's start. The two sides' runs alternate, so that load from other jobs falls on both.
The headline is the ratio after/before.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_io import emit, machine

REPO = Path(__file__).resolve().parents[1]
SHARED = re.compile(r"^(torch|nvidia|triton|cuda)", re.IGNORECASE)  # torch and its CUDA runtime
PROBES = {
    "import_synthtune_s": ["-c", "import synthtune"],
    "cli_help_s": ["-m", "synthtune.cli", "--help"],
    "import_train_loop_s": ["-c", "import synthtune.train.loop"],
}


def pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-c", str(REPO / "constraints.txt"), *args], check=True)


def size_mb(venv: Path) -> dict:
    site = next((venv / "lib").glob("python3*/site-packages"))
    total = shared = 0
    for entry in site.iterdir():
        n = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) if entry.is_dir() else entry.stat().st_size
        total += n
        shared += n if SHARED.match(entry.name) else 0
    dists = len(list(site.glob("*.dist-info")))
    return {"site_packages_mb": round(total / 2**20, 1), "without_torch_mb": round((total - shared) / 2**20, 1),
            "distributions": dists}


def wall(python: Path, args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(python), *args], check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def import_times(venvs: dict[str, Path], repeats: int, cwd: Path) -> dict[str, dict]:
    """Median wall time of each probe per venv, minus a bare interpreter's; the venvs alternate."""
    probes = {"bare": ["-c", "pass"], **PROBES}
    times: dict[str, dict[str, list[float]]] = {side: {p: [] for p in probes} for side in venvs}
    for _ in range(repeats):
        for probe, args in probes.items():
            for side, venv in venvs.items():
                times[side][probe].append(wall(venv / "bin" / "python", args, cwd))
    out = {}
    for side, by_probe in times.items():
        bare = statistics.median(by_probe.pop("bare"))
        out[side] = {p: round(statistics.median(t) - bare, 3) for p, t in by_probe.items()}
        out[side]["bare_interpreter_s"] = round(bare, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the venvs (their folder is printed)")
    args = ap.parse_args()
    torch_spec = next(line.split(";")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()
                      if line.startswith("torch=="))
    work = Path(tempfile.mkdtemp(prefix="install_bench_"))
    # a copy of the checkout without .venv: pip builds the wheel from it, and the probes run from an
    # empty folder so that they import the installed package, not the checkout
    src = work / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "results", "*.ipynb"))
    empty = work / "cwd"
    empty.mkdir()
    sides = {"after_core": "", "before_core_plus_zero_tracking": "[zero,tracking]"}
    venvs = {side: work / side for side in sides}
    result = {}
    try:
        for side, extras in sides.items():
            subprocess.run([sys.executable, "-m", "venv", str(venvs[side])], check=True)
            pip(venvs[side], torch_spec)
            pip(venvs[side], f"{src}{extras}")
            result[side] = size_mb(venvs[side])
        for side, row in import_times(venvs, args.repeats, empty).items():
            result[side].update(row)
    finally:
        if args.keep:
            print(f"venvs kept under {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    after, before = result["after_core"], result["before_core_plus_zero_tracking"]
    ratios = {k: round(after[k] / before[k], 3) for k in after if k in before and isinstance(after[k], (int, float))
              and before[k] and not k.startswith("bare")}
    emit({"benchmark": "install_bench", **machine(torch=torch_spec), "command": " ".join(sys.argv),
          **result, "after_over_before": ratios}, args.out)


if __name__ == "__main__":
    main()
