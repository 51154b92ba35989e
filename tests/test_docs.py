"""The docs say what runs: README.md and docs/*.md are checked against the code, and the cheap
blocks are run.

The marker: a fenced block whose info string is ``bash run``::

    ```bash run
    synthtune data check data/gsm8k_sample/test.jsonl
    # {"n_rows": 14, ...}
    ```

is RUNNABLE. Each runnable block runs on its own with ``bash -e -o pipefail``, cwd = the repository
root, the ``synthtune`` and ``accelerate`` of this interpreter's venv first on PATH, and a fresh
``SYNTHTUNE_OUTPUTS_DIR`` and ``SYNTHTUNE_CACHE_DIR`` in tmp (the cache holds the session's tiny
models). ``outputs/`` written in a command is that outputs dir. A comment line ``# {...}`` in the
block lists keys its output must contain. Runnable blocks must take seconds and stay off the
network: only tiny-llama, tiny-t5, ``configs/models/`` shapes and bundled data (the hub and pip are
switched off for them). Everything else in the docs is checked without running:

* every ``synthtune ...`` command (in bash blocks, and in inline code) names a real command, its
  ``--flags`` appear in that command's ``--help``, and its ``key=value`` overrides (with its
  ``--config``) load into the command's config; the same for ``fine_tune/train.py`` and the
  flags of ``accelerate launch``; ``make`` targets exist in the Makefile;
* every repository path a command or inline code names (``configs/…``, ``synthtune/…``, ...) and
  every ``synthtune.module.name`` exists;
* every relative link points to a file, and every ``#anchor`` to a heading of it;
* README's code map lists every top-level entry of the repository and of ``synthtune/``, and each
  library line imports only from the lines above it.

``docs/devlog.md`` is history and is not checked.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HISTORY = {"devlog.md"}
# Repository folders whose paths the docs name; a path under one of them must exist.
REPO_ROOTS = ("configs/", "fine_tune/", "bench/", "data/", "notebooks/", "synthtune/", "tests/", "docs/")
SHELLS = {"bash", "sh", "shell", "console"}
BLOCK_TIMEOUT_S = 240


def doc_files() -> list[Path]:
    docs = [p for p in sorted((REPO / "docs").glob("*.md")) if p.name not in HISTORY]
    return [REPO / "README.md", *docs]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------------------------------------
# reading markdown
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    info: str
    text: str

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.info.split() == ["bash", "run"]

    @property
    def shell(self) -> bool:
        return bool(self.info.split()) and self.info.split()[0] in SHELLS


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def parse(path: Path, text: str | None = None) -> tuple[list[Block], str]:
    """The fenced blocks of a markdown file, and its prose (the blocks blanked, line count kept)."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, prose, i = [], [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, start = m.group(1), i
        closing = re.compile(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*")
        i += 1
        while i < len(lines) and not closing.fullmatch(lines[i]):
            i += 1
        blocks.append(Block(path, start + 1, m.group(2).strip(), "\n".join(lines[start + 1:i])))
        prose += [""] * (i - start + 1)
        i += 1
    return blocks, "\n".join(prose)


def all_blocks() -> list[Block]:
    return [b for p in doc_files() for b in parse(p)[0]]


def runnable_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.runnable]


def inline_code(prose: str) -> list[str]:
    # `code` spans may wrap across lines in markdown; whitespace inside counts as one space
    return [" ".join(s.split()) for s in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose)]


def logical_lines(text: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return [s for s in out if s.strip() and not s.lstrip().startswith("#")]


def segments(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at | && || ;), redirections and env prefixes dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segs, cur, skip_next = [], [], False
    for tok in lexer:
        if skip_next:
            skip_next = False
            continue
        if tok in {"|", "||", "&&", ";", "&"}:
            segs.append(cur)
            cur = []
        elif tok in {">", ">>", "<", "2>", "&>"} or set(tok) <= set("<>&"):
            skip_next = True
        else:
            cur.append(tok)
    segs.append(cur)
    out = []
    for seg in segs:
        while seg and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", seg[0]):
            seg = seg[1:]
        if seg:
            if seg[0].startswith(".venv/bin/"):
                seg = [seg[0][len(".venv/bin/"):], *seg[1:]]
            out.append(seg)
    return out


# ---------------------------------------------------------------------------------------------
# the real CLI
# ---------------------------------------------------------------------------------------------

def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "300"  # --help tables must not cut option names
    env["NO_COLOR"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@cache
def help_flags(command: tuple[str, ...]) -> frozenset[str]:
    """The --flags that ``command --help`` prints (run once per command)."""
    proc = subprocess.run([*command, "--help"], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"`{' '.join(command)} --help` failed:\n{proc.stdout}{proc.stderr}"
    return frozenset(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", proc.stdout))


@cache
def click_root():
    import typer.main

    from synthtune import cli

    return typer.main.get_command(cli.app)


def resolve_command(args: list[str]) -> tuple[list[str], list[str], object]:
    """(command words after `synthtune`, remaining args, its click command)."""
    # duck-typed: typer builds on its own copy of click, so click's classes are not its classes
    cmd, words, rest = click_root(), [], list(args)
    while getattr(cmd, "commands", None) is not None and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in cmd.commands, f"`synthtune {' '.join([*words, name])}` is no command " \
                                     f"(choose from {', '.join(sorted(cmd.commands))})"
        cmd, words = cmd.commands[name], [*words, name]
    return words, rest, cmd


def value_flags(cmd) -> set[str]:
    """The options of a click command that take a value (not flags)."""
    return {o for p in cmd.params if p.param_type_name == "option" and not p.is_flag and not p.count
            for o in p.opts + p.secondary_opts}


def config_class(words: list[str]):
    from synthtune import config

    return getattr(config, "".join(w.capitalize() for w in words) + "Config", None)


def check_overrides(cls, config_path: str | None, overrides: list[str], what: str) -> None:
    from synthtune.config import load_config
    from synthtune.errors import ConfigError

    try:
        load_config(cls, REPO / config_path if config_path else None, overrides)
    except (ConfigError, TypeError, ValueError) as err:
        raise AssertionError(f"{what}: {err}") from None


def check_synthtune(args: list[str], what: str) -> None:
    words, rest, cmd = resolve_command(args)
    assert words, f"{what}: `synthtune` without a command"
    flags = help_flags(("synthtune", *words))
    takes_value = value_flags(cmd)
    overrides, config_path, i = [], None, 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            assert name in flags, f"{what}: `synthtune {' '.join(words)}` has no {name} (see its --help)"
            if name in takes_value and not eq:
                value = rest[i + 1] if i + 1 < len(rest) else ""
                i += 1
            if name == "--config":
                config_path = value
        elif "=" in tok and re.match(r"[A-Za-z_][\w-]*=", tok):
            overrides.append(tok)
        i += 1
    if overrides or config_path:
        cls = config_class(words)
        assert cls is not None, f"{what}: `synthtune {' '.join(words)}` takes no config or key=value"
        check_overrides(cls, config_path, overrides, what)


def check_train_script(args: list[str], what: str) -> None:
    """`fine_tune/train.py --config RECIPE key=value...`"""
    from synthtune.config import TrainConfig

    config_path, overrides, i = None, [], 0
    while i < len(args):
        if args[i] == "--config":
            config_path, i = args[i + 1], i + 1
        elif args[i].startswith("--config="):
            config_path = args[i].partition("=")[2]
        elif args[i].startswith("-"):
            raise AssertionError(f"{what}: fine_tune/train.py takes --config and key=value only, not {args[i]}")
        else:
            overrides.append(args[i])
        i += 1
    check_overrides(TrainConfig, config_path, overrides, what)


def check_segment(seg: list[str], what: str) -> None:
    head = seg[0]
    if head == "synthtune":
        check_synthtune(seg[1:], what)
    elif head == "accelerate" and seg[1:2] == ["launch"]:
        flags = help_flags(("accelerate", "launch"))
        args = seg[2:]
        script = next((i for i, a in enumerate(args) if a.endswith(".py")), None)
        assert script is not None, f"{what}: accelerate launch without a script"
        for a in args[:script]:
            if a.startswith("--"):
                assert a.partition("=")[0] in flags, f"{what}: `accelerate launch` has no {a}"
        if args[script] == "fine_tune/train.py":
            check_train_script(args[script + 1:], what)
    elif head in ("python", "python3") and seg[1:2] == ["fine_tune/train.py"]:
        check_train_script(seg[2:], what)
    elif head == "make":
        targets = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.M))
        for t in seg[1:]:
            if "=" not in t and not t.startswith("-"):
                assert t in targets, f"{what}: the Makefile has no target `{t}`"


def repo_paths(tokens: list[str]) -> list[str]:
    found = []
    for tok in tokens:
        tok = tok.partition("=")[2] if re.match(r"-*[\w-]+=", tok) else tok
        tok = tok.rstrip(".,;:)")
        if tok.startswith(REPO_ROOTS):
            found.append(tok)
    return found


def path_exists(path: str) -> bool:
    return any(REPO.glob(path)) if "*" in path else (REPO / path).exists()


# ---------------------------------------------------------------------------------------------
# every command, path and name in the docs
# ---------------------------------------------------------------------------------------------

def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, simple command) for each command in shell blocks and in inline code."""
    found = []
    for path in doc_files():
        blocks, prose = parse(path)
        for b in blocks:
            if b.shell:
                for line in logical_lines(b.text):
                    found += [(b.where, seg) for seg in segments(line)]
        for span in inline_code(prose):
            if re.match(r"(\.venv/bin/)?(synthtune|accelerate launch|make) ", span) and "..." not in span:
                found += [(rel(path), seg) for seg in segments(span)]
    return found


def test_docs_have_runnable_blocks_and_commands():
    assert len(runnable_blocks()) >= 5
    assert len([c for c in documented_commands() if c[1][0] == "synthtune"]) >= 30


@pytest.mark.parametrize("where,seg", documented_commands(),
                         ids=[f"{w}:{' '.join(seg[:3])}" for w, seg in documented_commands()])
def test_documented_command_is_real(where, seg):
    check_segment(seg, f"{where}: `{' '.join(seg)}`")
    for p in repo_paths(seg):
        assert path_exists(p), f"{where}: `{' '.join(seg)}` names {p}, which does not exist"


def test_paths_and_names_in_inline_code_exist():
    problems = []
    for path in doc_files():
        _, prose = parse(path)
        for span in inline_code(prose):
            for p in repo_paths(span.split()):
                if not path_exists(p):
                    problems.append(f"{rel(path)}: `{span}` names {p}, which does not exist")
            for name in re.findall(r"(?<![\w./])synthtune(?:\.\w+)+", span):
                if not dotted_name_exists(name):
                    problems.append(f"{rel(path)}: `{span}` names {name}, which does not exist")
    assert not problems, "\n".join(problems)


def dotted_name_exists(name: str) -> bool:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        module = ".".join(parts[:n])
        if (REPO / Path(*parts[:n])).with_suffix(".py").exists() or (REPO / Path(*parts[:n]) / "__init__.py").exists():
            obj = importlib.import_module(module)
            for attr in parts[n:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False


# ---------------------------------------------------------------------------------------------
# links
# ---------------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = parse(path)
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M)}


def test_relative_links_point_to_files_and_headings():
    problems = []
    for path in doc_files():
        _, prose = parse(path)
        prose = re.sub(r"`[^`]*`", "", prose)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                problems.append(f"{rel(path)}: link ({target}) points to a missing file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{rel(path)}: link ({target}): no heading #{anchor} in {dest.name}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# the code map
# ---------------------------------------------------------------------------------------------

def code_map() -> list[tuple[int, list[str], str]]:
    """README's map as (indent, names, description) lines: names, then two or more spaces, then what."""
    readme = REPO / "README.md"
    section = readme.read_text(encoding="utf-8").split("## Map of the code", 1)[1]
    block = parse(readme, section)[0][0]
    rows = []
    for line in block.text.splitlines():
        names, _, desc = line.strip().partition("  ")
        rows.append((len(line) - len(line.lstrip()), re.split(r"[,\s]+", names.strip()), desc.strip()))
    return rows


def test_code_map_lists_every_top_level_entry():
    rows = code_map()
    top = {n for indent, names, _ in rows if indent == 0 for n in names}
    inner = {n for indent, names, _ in rows if indent > 0 for n in names}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    entries = {line.split("/")[0] + ("/" if "/" in line else "") for line in tracked.splitlines()}
    missing = sorted(e for e in entries - {".gitignore"} if e not in top)
    assert not missing, f"README's code map lacks these top-level entries: {missing}"
    package = {p.name + ("/" if p.is_dir() else "") for p in (REPO / "synthtune").iterdir()
               if p.name != "__pycache__"}
    missing = sorted(package - inner)
    assert not missing, f"README's code map lacks these entries of synthtune/: {missing}"
    gone = sorted(n for n in inner if not (REPO / "synthtune" / n).exists())
    assert not gone, f"README's code map names entries synthtune/ does not have: {gone}"


def unit_imports(unit: str) -> set[str]:
    """The synthtune units (top-level module or package names) that `unit` imports anywhere."""
    import ast

    base = REPO / "synthtune" / unit.rstrip("/")
    files = list(base.rglob("*.py")) if base.is_dir() else [base]
    found = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for m in mods:
                parts = m.split(".")
                if parts[0] == "synthtune" and len(parts) > 1:
                    found.add(parts[1])
    return found - {unit.rstrip("/").removesuffix(".py")}


def test_code_map_library_order_is_the_import_order():
    units = {p.stem if p.suffix == ".py" else p.name for p in (REPO / "synthtune").iterdir()}
    seen: set[str] = set()
    problems = []
    for indent, names, desc in code_map():
        if indent == 0 or not desc.startswith("library:"):
            continue
        for name in names:
            later = sorted((unit_imports(name) & units) - seen)
            if later:
                problems.append(f"synthtune/{name} imports {later}, which README's map lists after it")
        seen |= {n.rstrip("/").removesuffix(".py") for n in names}
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# running the runnable blocks
# ---------------------------------------------------------------------------------------------

def expected_keys(block: Block) -> list[str]:
    keys = []
    for line in block.text.splitlines():
        comment = line.strip()
        if comment.startswith("# {"):
            keys += re.findall(r'"([\w.-]+)":', comment)
    return keys


def run_block(block: Block, root: Path) -> subprocess.CompletedProcess:
    from synthtune.models import build_tiny_model

    out, cache_dir = root / "outputs", root / "cache"
    (cache_dir / "models").mkdir(parents=True)
    for name in ("tiny-llama", "tiny-t5"):
        built = build_tiny_model(name)  # the session's cache: built once, then linked
        (cache_dir / "models" / built.name).symlink_to(built, target_is_directory=True)
    env = cli_env()
    env.update(SYNTHTUNE_OUTPUTS_DIR=str(out), SYNTHTUNE_CACHE_DIR=str(cache_dir),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PIP_NO_INDEX="1",
               SYNTHTUNE_SMOLLM2_SOURCE=str(root / "no-big-models-in-runnable-blocks"))
    script = re.sub(r"(?<![\w./-])outputs/", f"{out}/", block.text)
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


def repo_state() -> set[str]:
    """Untracked files and what outputs/ holds: a runnable block must write neither."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    outputs = REPO / "outputs"
    written = {str(p) for p in outputs.rglob("*")} if outputs.exists() else set()
    return {s for s in status if "__pycache__" not in s} | written


@pytest.fixture(scope="session")
def block_results(tmp_path_factory):
    blocks = runnable_blocks()
    before = repo_state()
    roots = [tmp_path_factory.mktemp(f"docs_block{i}") for i in range(len(blocks))]
    # two at a time: most of each block is a Python start-up, one core each
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(blocks, pool.map(run_block, blocks, roots), strict=True))
    return results, sorted(repo_state() - before)


@pytest.mark.integration  # runs the CLI in subprocesses (tiny models, ~40 s of CPU for all blocks)
@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.where)
def test_runnable_block_runs(block, block_results):
    results, _ = block_results
    proc = results[block]
    assert proc.returncode == 0, (f"{block.where} failed (exit {proc.returncode}):\n{block.text}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    missing = [k for k in expected_keys(block) if f'"{k}"' not in proc.stdout]
    assert not missing, f"{block.where}: the output lacks the documented keys {missing}:\n{proc.stdout[-3000:]}"


@pytest.mark.integration
def test_runnable_blocks_write_only_into_tmp(block_results):
    _, new = block_results
    assert not new, f"runnable blocks wrote into the repository: {new}"


def test_runnable_blocks_use_tiny_models_only():
    for block in runnable_blocks():
        for line in logical_lines(block.text):
            for seg in segments(line):
                models = [seg[i + 1] for i, t in enumerate(seg[:-1]) if t == "--model"]
                models += [t.partition("=")[2] for t in seg if t.startswith("model=")]
                for m in models:
                    assert m in ("tiny-llama", "tiny-t5") or m.startswith("configs/models/"), \
                        f"{block.where}: runnable blocks use tiny models or configs/models/ shapes, not {m}"
                assert not any(re.search(r"\b(hub|gsm8k):", t) for t in seg), \
                    f"{block.where}: runnable blocks use bundled data, not the hub or the full GSM8K"
