"""bench/README.md indexes every benchmark and result file, and result files are named by configuration.

These guard the bookkeeping, not the numbers: a script added without a row, a results file nobody
points at, or a name that says when it was made (``_fixed``, ``_session3``, ``_b``) instead of what
ran (``<bench>_<machine>[_<config>]``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULTS = BENCH / "results"
# the machine part of a result name: "cpu" or a card (h200, a100, a10g, l4, l40s, v100, mi300x, rtx4090)
MACHINE = re.compile(r"_(cpu|h\d+|a\d+g?|l\d+s?|v\d+|mi\d+x?|rtx\d+)(_|\.)")
HISTORY = re.compile(r"_(fixed|old|new|before|after|session\d*|round\d*|run\d*|[a-z])(_|\.)")
pytestmark = pytest.mark.skipif(not BENCH.is_dir(), reason="bench/ is not part of an installed package")


def index_text() -> str:
    return (BENCH / "README.md").read_text(encoding="utf-8")


def expand_braces(text: str) -> set[str]:
    """File names written in the index, with ``a_{x,y}.json`` expanded to ``a_x.json`` and ``a_y.json``."""
    names = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        parts = [token]
        while any("{" in p for p in parts):
            expanded = []
            for p in parts:
                m = re.search(r"\{([^{}]*)\}", p)
                if not m:
                    expanded.append(p)
                    continue
                expanded += [p[: m.start()] + alt + p[m.end():] for alt in m.group(1).split(",")]
            parts = expanded
        names.update(Path(p).name for p in parts)
    return names


def test_every_script_has_a_row():
    rows = re.findall(r"^\| \[([^\]]+)\]\(", index_text(), flags=re.M)
    scripts = sorted(p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh"))
    assert sorted(rows) == scripts


def test_every_results_file_is_indexed():
    named = expand_braces(index_text())
    missing = sorted(f.name for f in RESULTS.iterdir() if f.name not in named)
    assert not missing, f"bench/results files that bench/README.md does not name: {missing}"


def test_indexed_results_files_exist():
    # every file-like name in the index but the commands' own outputs and the pages it links to
    cited = {n for n in expand_braces(index_text()) if re.search(r"\.(json|jsonl|md|txt|log)$", n)}
    cited -= {"README.md", "RESULTS.md", "devlog.md", "log.txt", "summary.json", "fsdp_gpu_check.log"}
    missing = sorted(n for n in cited if not (RESULTS / n).exists())
    assert not missing, f"bench/README.md names results files that do not exist: {missing}"


def test_results_page_links_resolve():
    text = (BENCH / "RESULTS.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((results/[^)#]+)\)", text)
    assert links
    assert [link for link in links if not (BENCH / link).exists()] == []


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.iterdir()) if RESULTS.is_dir() else [])
def test_results_named_by_configuration(name):
    assert MACHINE.search(name), f"{name}: no machine in the name (<bench>_<machine>[_<config>], e.g. _cpu_ or _h200_)"
    assert not HISTORY.search(name), f"{name}: named by history; name the configuration that distinguishes it"
