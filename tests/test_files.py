"""Crash- and race-safe file operations: atomic replaces, directory publishing, directory locks.

Run: pytest tests/test_files.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthtune.errors import DirectoryInUse
from synthtune.files import atomic_write_text, lock_dir, publish_dir, replace_dir

# Each child waits at a barrier (a file per child) so that all of them start building at once,
# then reports which directory inode it was handed and reads the model back from it.
_RANK = """
import json, os, sys, time
from pathlib import Path
from synthtune.models import build_tiny_model, load_config
cache, rank, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
(cache.parent / f"ready-{rank}").touch()
while len(list(cache.parent.glob("ready-*"))) < n:
    time.sleep(0.01)
path = build_tiny_model("tiny-llama", seed=7, cache_dir=cache)
inode = os.stat(path / "config.json").st_ino
time.sleep(0.5)  # what a rank does next: load from it, while slower ranks are still finishing
cfg = load_config(str(path))
print(json.dumps({"inode": inode, "path": str(path), "layers": cfg.num_hidden_layers}))
"""


@pytest.mark.integration  # spawns one process per rank
def test_ranks_building_one_cached_model_at_once_share_one_complete_directory(tmp_path):
    # The old publish was "rmtree(target); os.replace(ours, target)": each rank that finished later
    # deleted the directory the earlier ones had been handed (or failed with ENOTEMPTY).
    cache, n = tmp_path / "cache", 2
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(cache), str(rank), str(n)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for rank in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    final = Path(results[0]["path"])
    assert {r["path"] for r in results} == {str(final)} and {r["layers"] for r in results} == {2}
    # every rank was handed the directory that is still there: none was replaced under another
    assert {r["inode"] for r in results} == {os.stat(final / "config.json").st_ino}
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [final.name]


def test_publish_keeps_a_complete_directory_and_replaces_an_incomplete_one(tmp_path):
    def complete(p):
        return (p / "done").exists()

    target = tmp_path / "model"
    target.mkdir()
    (target / "half").write_text("an interrupted build of an older version")
    built = tmp_path / ".build-1"
    built.mkdir()
    (built / "done").write_text("1")
    assert publish_dir(built, target, complete) == target
    assert sorted(p.name for p in target.iterdir()) == ["done"] and not built.exists()
    inode = os.stat(target / "done").st_ino
    late = tmp_path / ".build-2"
    late.mkdir()
    (late / "done").write_text("2")
    publish_dir(late, target, complete)  # someone else's complete copy is there: ours is discarded
    assert os.stat(target / "done").st_ino == inode and (target / "done").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replace_dir_swaps_whole_directories(tmp_path):
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "old.arrow").write_text("old")
    new = tmp_path / ".dataset-new"
    new.mkdir()
    (new / "new.arrow").write_text("new")
    replace_dir(new, target)
    assert [p.name for p in target.iterdir()] == ["new.arrow"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "fingerprint.json"
    atomic_write_text(path, '{"k": 8}\n')

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, '{"k": 4}\n')
    assert path.read_text() == '{"k": 8}\n' and [p.name for p in tmp_path.iterdir()] == ["fingerprint.json"]


def test_a_locked_directory_names_its_holder(tmp_path):
    with lock_dir(tmp_path / "out", "synthesis run") as lock:
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["what"] == "synthesis run"
        # a second holder, even in the same process (another open file description), is refused
        with pytest.raises(DirectoryInUse, match=f"out is in use by another synthesis run: PID {os.getpid()}"):
            with lock_dir(tmp_path / "out", "synthesis run"):
                pass
    with lock_dir(tmp_path / "out", "synthesis run"):  # released on exit
        pass
