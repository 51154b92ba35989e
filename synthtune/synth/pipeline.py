"""The synthesis loop: prompts -> k samples -> vote -> evaluator -> kept, or back for another round.

Files in the output directory:

* ``kept.jsonl``: append-only kept examples (question, rationale, answer, scores, provenance);
* ``status.jsonl``: append-only, one record per question per round, with the stage counts;
* ``summary.json``, ``agreement_hist.png``, ``config.yaml``;
* ``fingerprint.json``: the settings that decide what is sampled and kept (resume checks them);
* ``.synthtune.lock``: held (``flock``) while a run writes the directory; a second run is refused.

Resume: kept rows are appended before the status records of the same batch. On start, kept
rows whose (question, round) has no status record belong to a batch that was in flight when
the run died; they are dropped (and a torn last line with them), and that round is redone.
So a rerun after ``kill -9`` has no duplicates and loses only the batch in flight. Batches
and their seeds are fixed by the questions that entered each round, so the batches a resumed run
samples are the ones an uninterrupted run would have sampled, seeds included. (Unless a batch's
status lines were torn part-way: that batch is redone with only its unrecorded questions.)
Files that disagree in any other way are damage, not a crash: the run stops before writing
anything (see :func:`load_state`).

Rationalization (``rationalize``, STaR: Zelikman et al. 2022): in each batch, the questions no
direct sample solved are asked again with the gold answer as a hint
(:func:`synthtune.formats.rationalization_hint`), and those rationales go through the same
evaluator plus a ``hint_free`` stage. It happens before the batch is written, so its kept rows
(``provenance.rationalized: true``, the hint-free question and prompt sha) and the status
record's ``rationalization`` block (that route's stage counts and reason, the hinted prompt's sha)
are journaled, resumed and redone with the batch, under a seed of their own.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from synthtune import paths
from synthtune.config import SynthConfig, save_config, to_dict
from synthtune.data.answers import extract_answer, extract_gold, is_computed
from synthtune.data.calculator import CHECK_VERSION
from synthtune.data.gsm8k import is_test_source, load_source
from synthtune.data.jsonl import append_jsonl, read_appended, write_jsonl
from synthtune.errors import ConfigError, DataError
from synthtune.files import atomic_write_bytes, atomic_write_text, lock_dir
from synthtune.formats import HINT_VERSION, PROMPT_VERSION, rationalization_hint, resolve_format, stop_strings
from synthtune.generation.base import SamplingParams
from synthtune.synth.diversity import below_mean_recall, select_diverse
from synthtune.synth.prompts import build_prompt, leaks_hint
from synthtune.synth.scorers import calculator_score, gold_correctness, guarded, vote_share
from synthtune.synth.vote import majority_vote

KEPT, STATUS, SUMMARY, HIST = "kept.jsonl", "status.jsonl", "summary.json", "agreement_hist.png"
FINGERPRINT = "fingerprint.json"
#: The evaluator's stages, in order; each status record counts the samples that got past each.
STAGES = ("sampled", "finished", "parsed", "on_target", "calc_ok", "reward_ok", "kept")
#: The same evaluator for rationales sampled with the gold answer as a hint (``rationalize``), with
#: two stages more: ``hint_free``, the rationale never mentions the hint (synth.prompts.leaks_hint),
#: and ``derived``, its working computes the answer: a checked calculation's ``= N`` gives it
#: (data.answers.is_computed). A hinted sample can reach the gold answer by copying it ("#### 72",
#: or "340*1 = 340 ... #### 70"); trained on under the unhinted question, that would teach the
#: model to state answers without working them out.
RATIONALE_STAGES = ("sampled", "finished", "hint_free", "parsed", "on_target", "derived", "calc_ok", "reward_ok",
                    "kept")
#: Where a kept rationale came from: the question alone, or the question with its answer as a hint.
ROUTES = ("direct", "rationalized")
#: Rationales of a batch are drawn with their own seed, away from every direct batch's (which step by
#: 7919 a round and by the batch's start within one), so both routes stay reproducible on resume.
RATIONALE_SEED_OFFSET = 1_000_003
#: Settings that change what a question's samples are, or which of them are kept; a rerun must
#: match them to resume (or pass allow_changed_settings). batch_size is one: a batch's seed is
#: derived from its position. Left out on purpose: where and how fast samples are drawn
#: (endpoints, concurrency, retries, device, sampler: like a device, it changes the draws, never what
#: a sample is or how it is judged), how many rounds (a rerun with more rounds continues
#: the failed questions) and which questions (limit: a rerun with a larger one adds questions).
FINGERPRINT_KEYS = ("model", "backend", "served_model", "questions", "exemplars", "exemplar_pool_size", "shots",
                    "strategy", "prompt_format", "seed", "use_gold",
                    "k", "k_growth", "temperature", "temperature_step", "top_p", "top_k", "presence_penalty",
                    "frequency_penalty", "max_new_tokens", "calculator", "stop", "batch_size", "min_agreement",
                    "min_calc", "reward_model", "min_reward", "max_keep", "diversity", "rouge_threshold",
                    "rationalize", "rationalize_k")
#: Settings newer than some output directories, with the value every run before them sampled
#: with: such a run is then checked as if it had recorded them, instead of going unchecked.
ADDED_LATER = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "calculator": False, "rationalize": False,
               "rationalize_k": None}
_SURROGATES = re.compile("[\ud800-\udfff]")


def question_id(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:12]


@dataclass
class Item:
    id: str
    question: str
    gold: str | None


@dataclass
class RunState:
    """What earlier runs in this directory finished, rebuilt from its files."""

    rounds_done: dict[str, int] = field(default_factory=dict)  # question id -> rounds completed
    kept_texts: dict[str, list[str]] = field(default_factory=dict)  # question id -> kept rationales
    records: list[dict] = field(default_factory=list)  # every status record
    kept_rows: list[dict] = field(default_factory=list)  # every kept row a status record vouches for
    dropped_in_flight: int = 0  # kept rows of the batch in flight when a run died
    status_torn: bool = False  # the file ends in a torn line (a crash mid-write)
    kept_torn: bool = False


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


def load_items(cfg: SynthConfig) -> tuple[list[Item], list[dict], str]:
    """Questions to answer and the exemplar pool, guaranteed disjoint; the pool never from test."""
    q_split = load_source(cfg.questions, cfg.gsm8k_dir)
    ex_spec = cfg.exemplars or _train_spec_of(cfg.questions)
    if is_test_source(ex_spec):
        raise ConfigError(f"exemplars={ex_spec!r} is a test split: few-shot exemplars drawn from the test set "
                          f"leak it into every prompt (the 2023 workshop's bug). Use a train split or a file "
                          f"of your own.")
    rows = q_split.rows
    if ex_spec == cfg.questions:
        # One source for both: hold out a seeded slice as the pool, so no question is ever an
        # exemplar (for itself or, through reuse, for the others).
        order = sorted(range(len(rows)), key=lambda i: hashlib.sha256(f"{cfg.seed}:{i}".encode()).hexdigest())
        n_pool = min(cfg.exemplar_pool_size, len(rows) - 1)
        if n_pool < cfg.shots:
            raise ConfigError(f"{cfg.questions} has {len(rows)} rows: too few to hold out {cfg.shots} exemplars "
                              f"and still have questions; pass exemplars=... from another source")
        pool_idx = set(order[:n_pool])
        pool = [rows[i] for i in sorted(pool_idx)]
        rows = [r for i, r in enumerate(rows) if i not in pool_idx]
    else:
        pool = load_source(ex_spec, cfg.gsm8k_dir).rows
        if not all("answer" in r for r in pool):
            raise DataError(ex_spec, None, "has rows without an 'answer'", "exemplars need worked solutions",
                            field="answer")
    asked = {" ".join(r["question"].split()).lower() for r in rows}
    pool = [r for r in pool if " ".join(r["question"].split()).lower() not in asked]
    if cfg.limit is not None:
        rows = rows[:cfg.limit]
    items, seen = [], set()
    for r in rows:
        qid = question_id(r["question"])
        if qid in seen:  # duplicated questions would otherwise be synthesized twice
            continue
        seen.add(qid)
        gold = r.get("answer")
        items.append(Item(qid, r["question"], str(gold) if gold is not None and cfg.use_gold else None))
    return items, pool, ex_spec


def _train_spec_of(spec: str) -> str:
    name, sep, split = spec.partition(":")
    if sep and name in ("bundled", "gsm8k", "hub", "dir"):
        return f"{name}:train"
    return spec


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------

_MISMATCH_HINT = ("the directory's files no longer agree (edited, truncated, restored from another time, or "
                  "mixed from two runs); nothing was changed. Restore them from a backup, or start over in "
                  "another out=... (kept.jsonl is a valid dataset as it stands)")


def load_state(out_dir: Path, batch_size: int) -> RunState:
    """What earlier runs in ``out_dir`` finished, after checking that its files agree. Writes nothing.

    Kept rows are appended before the status records that vouch for them, so the only kept rows
    without a record a crash can leave are one batch in flight: the rows after every vouched one,
    of one round, of at most ``batch_size`` questions. Those are dropped (``repair_state``
    rewrites the file), and so is a torn last line of either file. Anything else (a bad line mid
    file, a missing ``status.jsonl``, more unvouched rows than one batch, a question whose kept
    rows and record disagree) means the files were damaged, and raises :class:`DataError` before
    anything is written.

    Rebuilding ``status.jsonl`` from ``kept.jsonl`` was the alternative, and is refused on purpose:
    only the status says which questions failed or await a retry, what the vote and the stage
    counts were, and which kept rows a finished batch vouched for, so a rebuilt one would invent
    records, and would let a half-written batch's rows pass as finished. Stopping keeps every row
    where it is and lets the user choose.
    """
    state = RunState()
    status_path, kept_path = out_dir / STATUS, out_dir / KEPT
    status, state.status_torn = _read_for_resume(status_path, ("id", "round", "status", "stages"))
    kept, state.kept_torn = _read_for_resume(kept_path, ("id", "rationale", "provenance"))
    if (kept.rows or state.kept_torn) and not status_path.exists():
        raise DataError(status_path, None, f"is missing, but {kept_path.name} holds {len(kept.rows)} rows: "
                        f"without the status records nothing tells which of them a finished batch vouched for",
                        _MISMATCH_HINT)
    vouched: dict[tuple[str, int], tuple[int, int]] = {}  # (id, round) -> (kept rows recorded, status line)
    for r, line in zip(status.rows, status.lines, strict=True):
        n = _kept_in_record(r)
        if not isinstance(n, int) or not isinstance(r["round"], int):
            raise DataError(status_path, line, "has no integer 'round', 'stages.kept' or 'rationalization.stages.kept'",
                            "status records are written by synthtune; " + _MISMATCH_HINT)
        vouched[(r["id"], r["round"])] = (n, line)
        state.rounds_done[r["id"]] = max(state.rounds_done.get(r["id"], 0), r["round"] + 1)
    state.records = status.rows
    have: Counter = Counter()
    last_vouched, unvouched = 0, []
    for r, line in zip(kept.rows, kept.lines, strict=True):
        rnd = r["provenance"].get("round") if isinstance(r["provenance"], dict) else None
        if not isinstance(rnd, int):
            raise DataError(kept_path, line, "has no integer 'provenance.round'",
                            "kept rows are written by synthtune; " + _MISMATCH_HINT)
        if (r["id"], rnd) in vouched:
            have[(r["id"], rnd)] += 1
            last_vouched = line
            state.kept_rows.append(r)
        else:
            unvouched.append((line, rnd, r["id"]))
    for (qid, rnd), (n, line) in vouched.items():
        if have[(qid, rnd)] != n:
            raise DataError(kept_path, None, f"holds {have[(qid, rnd)]} rows for question {qid} round {rnd}, "
                            f"but {status_path.name}:{line} records {n} kept", _MISMATCH_HINT)
    if unvouched:
        lines = [line for line, _, _ in unvouched]
        one_batch = (min(lines) > last_vouched and len({rnd for _, rnd, _ in unvouched}) == 1
                     and len({qid for _, _, qid in unvouched}) <= batch_size)
        if not one_batch:
            shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
            raise DataError(kept_path, lines[0], f"and {len(lines) - 1} more rows (lines {shown}) have no record "
                            f"in {status_path.name}, more than the one batch (at most {batch_size} questions, "
                            f"after every recorded row) a crash can leave unrecorded", _MISMATCH_HINT)
    state.dropped_in_flight = len(unvouched)
    for r in state.kept_rows:
        state.kept_texts.setdefault(r["id"], []).append(r["rationale"])
    return state


def _route_kept(stages) -> int | None:
    n = stages.get("kept") if isinstance(stages, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _kept_in_record(record: dict) -> int | None:
    """Kept rows a status record vouches for: its direct samples' plus its rationales' (None: malformed)."""
    n = _route_kept(record["stages"])
    rat = record.get("rationalization")
    if rat is None or n is None:
        return n
    m = _route_kept(rat.get("stages") if isinstance(rat, dict) else None)
    return None if m is None else n + m


def _read_for_resume(path: Path, required: tuple[str, ...]):
    try:
        return read_appended(path, required=required)
    except DataError as exc:
        raise DataError(exc.path, exc.line, exc.problem, "a crash only ever tears the last line, which resume "
                        "repairs; a bad line elsewhere means the file was edited or damaged. Nothing was "
                        "changed: fix or delete that line, or start over in another out=...", field=exc.field) from None


def repair_state(out_dir: Path, state: RunState) -> None:
    """Drop the torn last lines and the batch in flight that :func:`load_state` found, atomically.

    Rewritten whole, so the next append starts on a clean line instead of burying a fragment mid
    file, where the next resume would refuse it as damage.
    """
    if state.status_torn:
        write_jsonl(out_dir / STATUS, state.records)
    if state.kept_torn or state.dropped_in_flight:
        write_jsonl(out_dir / KEPT, state.kept_rows)
    if not (out_dir / STATUS).exists():
        # Created before the first kept row is appended, so a status.jsonl that is missing later
        # can only mean damage (see load_state), never a crash in the first batch.
        atomic_write_bytes(out_dir / STATUS, b"")


def _fingerprint(cfg: SynthConfig) -> dict:
    # prompt_version is no setting: it names the prompt text this synthtune renders for the same settings.
    # hint_version names the rationalization hint's text, recorded only by runs that use it (a run
    # without rationalization is the same whatever the hint says); check_version, likewise, the
    # calculator check's rules, recorded by runs that filter on it.
    fp = {**{k: getattr(cfg, k) for k in FINGERPRINT_KEYS}, "prompt_version": PROMPT_VERSION}
    if cfg.rationalize:
        fp["hint_version"] = HINT_VERSION
    if _uses_checker(fp):
        fp["check_version"] = CHECK_VERSION
    return fp


def _uses_checker(settings: dict) -> bool:
    """Whether a run with these settings keeps rows by ``check_calculations`` (``min_calc`` above 0, or
    rationalization's ``derived`` stage). A setting missing from an old fingerprint counts as its default."""
    min_calc = settings.get("min_calc", SynthConfig.min_calc)
    return bool(settings.get("rationalize")) or (isinstance(min_calc, (int, float)) and min_calc > 0)


def _previous_settings(out_dir: Path) -> tuple[dict, bool] | None:
    """The settings of the runs that wrote ``out_dir``, and whether ``fingerprint.json`` lacks some
    (None for a fresh directory).

    ``fingerprint.json`` first; settings it lacks (written before they were fingerprinted) come
    from the ``config.yaml`` the last run saved beside it, which holds every setting.
    """
    fp_path, cfg_path = out_dir / FINGERPRINT, out_dir / "config.yaml"
    has_data = any((out_dir / name).exists() for name in (STATUS, KEPT))
    if not fp_path.exists() and not has_data:
        return None
    old: dict = {}
    if fp_path.exists():
        try:
            old = json.loads(fp_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(fp_path, None, f"is not valid JSON ({exc})", "restore it, or delete it to check this "
                            "run against config.yaml instead") from None
        if not isinstance(old, dict):
            raise DataError(fp_path, None, "is not a JSON object", "restore it, or delete it to check this run "
                            "against config.yaml instead")
    outdated = any(k not in old for k in FINGERPRINT_KEYS)
    if outdated and cfg_path.exists():
        try:
            saved = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            saved = None
        if isinstance(saved, dict):
            old = {**{k: saved[k] for k in FINGERPRINT_KEYS if k in saved}, **old}
    return old, outdated


def _check_resume(out_dir: Path, cfg: SynthConfig, log: Callable[[str], None]) -> tuple[dict | None, dict]:
    """Refuse to resume ``out_dir`` with other sampling settings.

    Returns the fingerprint to write (None: the one there is current) and the earlier settings.

    With ``allow_changed_settings`` the run goes on, the change is logged, and the fingerprint
    takes the new settings with the change recorded in its ``changes`` list.
    """
    new = _fingerprint(cfg)
    previous = _previous_settings(out_dir)
    if previous is None:
        return new, {}
    old, outdated = previous
    # A run that recorded no prompt_version predates it: its prompts were version 1; likewise the
    # settings added later were off in it.
    old = {"prompt_version": 1, **ADDED_LATER, **old}
    if "check_version" not in old and _uses_checker(old):
        old["check_version"] = 1  # it checked calculations before their rules were recorded
    diff = {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}
    unknown = [k for k in FINGERPRINT_KEYS if k not in old]
    changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
    if diff and not cfg.allow_changed_settings:
        raise ConfigError(f"{out_dir} holds a run with other settings ({changes}); resuming would mix samples "
                          f"drawn under both in one dataset. Use another out=..., restore the settings to "
                          f"continue that run, or pass --allow-changed-settings (allow_changed_settings=true) "
                          f"to continue with the new ones on purpose.")
    if unknown:
        # Directories from before these settings were fingerprinted, with no config.yaml to read
        # them from: refusing would strand every such run, so it goes on and says what it can't check.
        log(f"resume: {out_dir} does not record {', '.join(unknown)} (written by an older synthtune); "
            f"assuming this run's values, which cannot be checked against the earlier runs")
    if not diff and not outdated:
        return None, old
    fp = {**new, "changes": list(old.get("changes", []))}
    if diff:
        log(f"resume: continuing {out_dir} with changed settings ({changes}) as allowed; kept rows record their "
            f"own round, seed and temperature in 'provenance'")
        fp["changes"].append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "settings": {k: [a, b] for k, (a, b) in diff.items()}})
    return fp, old


# --------------------------------------------------------------------------------------------
# the evaluator for one question
# --------------------------------------------------------------------------------------------


def evaluate_question(item: Item, samples, cfg: SynthConfig, kept_before: Sequence[str],
                      reward_fn: Callable | None = None, hint: str | None = None) -> tuple[list[int], dict, dict[str, list]]:
    """Decide which samples to keep. Returns (kept indices, status fields, per-sample scores).

    ``hint``: the samples are rationales drawn with this hint in the prompt (``rationalize``). They
    go through the same stages, plus ``hint_free`` (:data:`RATIONALE_STAGES`): one that mentions the
    hint is dropped, since it would teach the model to cite an answer it is never given, and so is
    one whose checked calculations never compute the answer (``derived``): it copied it.
    """
    texts = [s.text for s in samples]
    answers = [extract_answer(t) for t in texts]
    vote = majority_vote(answers)
    gold = extract_gold(item.gold) if item.gold is not None else None
    scores = {"vote_share": vote_share(item.question, texts), "calc": calculator_score(item.question, texts),
              "gold": gold_correctness(item.question, texts, item.gold) if gold is not None else [None] * len(texts)}
    consensus = vote.answer is not None and vote.share >= cfg.min_agreement
    target = gold if gold is not None else (vote.answer if consensus else None)
    counts = Counter(sampled=len(samples))
    passing: list[int] = []
    for i, s in enumerate(samples):
        if s.finish_reason == "length":  # never finished its answer: not a usable rationale
            continue
        counts["finished"] += 1
        if hint is not None:
            if leaks_hint(s.text, hint):
                continue
            counts["hint_free"] += 1
        if answers[i] is None:
            continue
        counts["parsed"] += 1
        if target is None or answers[i] != target:
            continue
        counts["on_target"] += 1
        calc = scores["calc"][i]
        if hint is not None:
            # the answer must come out of the working: copied, it is no rationale at all
            if calc is None or not is_computed(s.text, target):
                continue
            counts["derived"] += 1
        if calc is not None and calc < cfg.min_calc:
            continue
        counts["calc_ok"] += 1
        passing.append(i)
    # A scorer that failed on a sample fails that sample (and says why in the status), never the run.
    failures = [{"scorer": name, "sample": i, "reason": why}
                for name, got in scores.items() for i, why in sorted(getattr(got, "failures", {}).items())]
    reward = [None] * len(texts)
    if reward_fn is not None and passing:
        got = guarded(reward_fn)(item.question, [texts[i] for i in passing], item.gold)
        for i, r in zip(passing, got, strict=True):
            reward[i] = r
        failures += [{"scorer": "reward", "sample": passing[j], "reason": why} for j, why in got.failures.items()]
        if cfg.min_reward is not None:
            passing = [i for i in passing if reward[i] is not None and reward[i] >= cfg.min_reward]
    failed = {f["sample"] for f in failures}
    passing = [i for i in passing if i not in failed]
    scores["reward"] = reward
    counts["reward_ok"] = len(passing)
    kept = _select(passing, texts, reward, kept_before, cfg)
    counts["kept"] = len(kept)
    if kept:
        reason = "kept"
    elif gold is None and not consensus:
        reason = "no_consensus"
    else:
        reason = "no_passing_path" if len(kept_before) < cfg.max_keep else "no_new_distinct_path"
    status = {"majority": vote.answer, "vote_share": round(vote.share, 4), "consensus": consensus,
              "gold": gold, "reason": reason,
              "stages": {k: counts.get(k, 0) for k in (STAGES if hint is None else RATIONALE_STAGES)}}
    if failures:
        status["scorer_failures"] = failures
    return kept, status, scores


def _select(passing: list[int], texts: list[str], reward: list, kept_before: Sequence[str],
            cfg: SynthConfig) -> list[int]:
    room = cfg.max_keep - len(kept_before)
    if room <= 0 or not passing:
        return []
    if cfg.diversity == "none":
        return passing[:room]
    if cfg.diversity == "workshop":
        chosen = [passing[j] for j in below_mean_recall([texts[i] for i in passing])]
        return chosen[:room]
    # Paths kept in earlier rounds come first with top priority, so a new path must differ from them too.
    pool = list(kept_before) + [texts[i] for i in passing]
    prio = [float("inf")] * len(kept_before) + [r if r is not None else 0.0 for r in (reward[i] for i in passing)]
    picked = select_diverse(pool, max_keep=cfg.max_keep, threshold=cfg.rouge_threshold, priority=prio)
    return [passing[j - len(kept_before)] for j in picked if j >= len(kept_before)][:room]


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def default_out_dir(cfg: SynthConfig) -> Path:
    slug = f"{Path(cfg.model).name}-{cfg.questions.replace(':', '-').replace('/', '_')}"
    return paths.OUTPUTS_DIR / "synth" / slug


def run_synthesis(cfg: SynthConfig, backend=None, *, progress: bool = True, log: Callable[[str], None] = print,
                  reward_fn: Callable | None = None) -> dict:
    """Run (or resume) synthesis; returns the summary also written to ``summary.json``."""
    from synthtune.synth.backends import check_calculator_backend

    check_calculator_backend(cfg)  # before anything is read or written
    out_dir = Path(cfg.out) if cfg.out else default_out_dir(cfg)
    cfg = replace(cfg, out=str(out_dir))
    if cfg.backend == "openai" and not cfg.served_model:
        # recorded by name, so config.yaml and the resume fingerprint say what the servers ran
        cfg = replace(cfg, served_model=cfg.model)
    if cfg.rationalize and not cfg.use_gold:
        raise ConfigError("rationalize=true needs use_gold=true: its hint is the gold answer, and without gold "
                          "nothing checks that a rationale reached it. Turn one of them off.")
    items, pool, ex_spec = load_items(cfg)
    with lock_dir(out_dir, "synthesis run"):
        # Everything is read and checked before the first write, so a refused resume (other
        # settings, damaged files) leaves the directory exactly as it was.
        fingerprint, previous = _check_resume(out_dir, cfg, log)
        # The batch in flight was cut by the batch size of the run that died.
        died_with = previous.get("batch_size")
        state = load_state(out_dir, max(cfg.batch_size, died_with if isinstance(died_with, int) else 0))
        if fingerprint is not None:
            atomic_write_text(out_dir / FINGERPRINT, json.dumps(fingerprint, indent=2) + "\n")
        save_config(cfg, out_dir / "config.yaml")
        repair_state(out_dir, state)
        if state.dropped_in_flight:
            log(f"resume: dropped {state.dropped_in_flight} kept rows of a batch that was in flight; redoing it")
        own_backend = backend is None
        if own_backend:
            from synthtune.synth.backends import backend_for

            backend = backend_for(cfg)
        try:
            return _run(cfg, backend, out_dir, items, pool, ex_spec, state, progress=progress, log=log,
                        reward_fn=reward_fn)
        finally:
            if own_backend and hasattr(backend, "close"):
                backend.close()


def prompt_setup(cfg: SynthConfig, backend) -> tuple[str, tuple[str, ...]]:
    """The prompt format this run uses with ``backend`` (``auto`` resolved) and its stop strings
    (the user's ``stop`` first, then the format's own)."""
    # A server-side backend has no local tokenizer to look at; formats' auto rule covers that case.
    fmt = resolve_format(cfg.prompt_format, backend.tokenizer, backend.is_seq2seq,
                         server_renders=getattr(backend, "chat_on_server", False))
    return fmt, stop_strings(fmt, cfg.stop)


def _run(cfg: SynthConfig, backend, out_dir: Path, items: list[Item], pool: list[dict], ex_spec: str,
         state: RunState, *, progress: bool, log: Callable[[str], None], reward_fn: Callable | None) -> dict:
    if reward_fn is None and cfg.reward_model:
        from synthtune.synth.scorers import RewardModelScorer

        reward_fn = RewardModelScorer(cfg.reward_model, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    fmt, stop = prompt_setup(cfg, backend)
    chat_on_server = getattr(backend, "chat_on_server", False)
    endpoints = getattr(backend, "endpoints", None)
    where = f" on {len(endpoints)} endpoints" if endpoints else ""
    if getattr(backend, "sampler", None):
        where += f", sampler {backend.sampler}"
    via = f", {backend.name} backend ({backend.model_name}{where})"
    log(f"synth: {len(items)} questions from {cfg.questions}, {len(pool)} exemplars from {ex_spec}, "
        f"{cfg.shots}-shot {fmt} prompts, k={cfg.k}, up to {cfg.rounds} rounds{via} -> {out_dir}")
    if cfg.rationalize:
        no_gold = sum(1 for it in items if it.gold is None or extract_gold(it.gold) is None)
        log(f"rationalize: unsolved questions are asked again with the gold answer as a hint (k="
            f"{cfg.rationalize_k or 'the round’s k'})" + (f"; {no_gold} questions have no gold answer and are not"
                                                           f" rationalized" if no_gold else ""))
    done = {qid for qid, texts in state.kept_texts.items() if texts}
    solved_in: dict[str, int] = {}  # question id -> the round that solved it
    for r in state.records:
        if r["status"] == "done":
            solved_in[r["id"]] = min(r["round"], solved_in.get(r["id"], r["round"]))
    t_run, n_samples, n_tokens = time.perf_counter(), 0, 0
    round_reports = []
    for rnd in range(cfg.rounds):
        # The questions that entered this round fix its batches and their seeds. A resumed run
        # rebuilds the same batches, skips the recorded ones, and samples the rest with the seeds
        # an uninterrupted run would have used.
        entered = [it for it in items if state.rounds_done.get(it.id, 0) >= rnd and solved_in.get(it.id, rnd) >= rnd]
        todo = [it for it in entered if it.id not in done and state.rounds_done.get(it.id, 0) == rnd]
        skipped = sum(1 for it in items if it.id in done or state.rounds_done.get(it.id, 0) > rnd)
        if not todo:
            continue
        k = max(1, int(round(cfg.k * cfg.k_growth ** rnd)))
        temperature = min(cfg.temperature + cfg.temperature_step * rnd, 2.0)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                                top_k=cfg.top_k, num_samples=k, stop=stop, seed=cfg.seed + 7919 * rnd,
                                presence_penalty=cfg.presence_penalty, frequency_penalty=cfg.frequency_penalty,
                                calculator=cfg.calculator)
        rep = {"round": rnd + 1, "questions": len(todo), "skipped_done": skipped, "k": k,
               "temperature": round(temperature, 3), "kept_questions": 0, "kept_examples": 0,
               "rationalized_questions": 0, "rationalized_examples": 0}
        bar = _bar(progress, len(todo), f"round {rnd + 1}/{cfg.rounds}")
        t_round = time.perf_counter()
        for start in range(0, len(entered), cfg.batch_size):
            batch = [it for it in entered[start:start + cfg.batch_size]
                     if it.id not in done and state.rounds_done.get(it.id, 0) == rnd]
            if not batch:
                continue  # recorded before the interruption
            # A fresh exemplar draw each round (the seed moves with the round) gives retries new context.
            prompts = [build_prompt(it.question, pool, k=cfg.shots, fmt=fmt, tokenizer=backend.tokenizer,
                                    strategy=cfg.strategy, seed=cfg.seed + 7919 * rnd, render_chat=not chat_on_server)
                       for it in batch]
            outs = [[_storable(s) for s in samples]
                    for samples in backend.sample(prompts, replace(params, seed=params.seed + start))]
            kept_rows, status_rows = [], []
            for it, prompt, samples in zip(batch, prompts, outs, strict=True):
                n_samples += len(samples)
                n_tokens += sum(s.n_tokens for s in samples)
                kept, status, scores = evaluate_question(it, samples, cfg, state.kept_texts.get(it.id, []), reward_fn)
                for i in kept:
                    kept_rows.append(_kept_row(it, samples[i], i, scores, prompt, backend, cfg, rnd, temperature,
                                               params.seed + start))
                    state.kept_texts.setdefault(it.id, []).append(samples[i].text)
                status_rows.append({"id": it.id, "round": rnd, "status": "done" if kept else "retry",
                                    "question": it.question, "k": k, "temperature": round(temperature, 3),
                                    "prompt_sha": prompt.sha, **status})
                rep["kept_examples"] += len(kept)
            if cfg.rationalize and rnd + 1 >= cfg.rounds:
                # After the direct rounds only: an unsolved question gets every direct retry first
                # (fresh exemplars, a higher temperature), since its own rationale is better data
                # than a hinted one. Within the batch, before anything is written: its rationales are journaled with its
                # direct samples (kept rows, then the status records that vouch for both), so a crash
                # redoes the two together and a resumed run draws the same rationales.
                got = _rationalize(batch, prompts, status_rows, pool, fmt, backend, cfg, state, reward_fn,
                                   replace(params, num_samples=cfg.rationalize_k or k,
                                           seed=params.seed + start + RATIONALE_SEED_OFFSET),
                                   rnd, temperature, chat_on_server)
                kept_rows += got["rows"]
                n_samples += got["samples"]
                n_tokens += got["tokens"]
                rep["rationalized_questions"] += got["questions"]
                rep["rationalized_examples"] += len(got["rows"])
                rep["kept_examples"] += len(got["rows"])
            for it, r in zip(batch, status_rows, strict=True):
                if state.kept_texts.get(it.id):
                    r["status"] = "done"
                    done.add(it.id)
                    solved_in[it.id] = rnd
                    rep["kept_questions"] += 1
                elif rnd + 1 >= cfg.rounds:
                    r["status"] = "failed"
            # kept rows first, then the status that vouches for them (see the module docstring)
            append_jsonl(out_dir / KEPT, kept_rows)
            append_jsonl(out_dir / STATUS, status_rows)
            state.records.extend(status_rows)
            for r in status_rows:
                state.rounds_done[r["id"]] = r["round"] + 1
            elapsed = time.perf_counter() - t_run
            bar.update(len(batch))
            bar.set_postfix(kept=len(done), samples_s=f"{n_samples / elapsed:.2f}", tok_s=f"{n_tokens / elapsed:.1f}")
        bar.close()
        rep["seconds"] = round(time.perf_counter() - t_round, 2)
        round_reports.append(rep)
        rationalized = (f" ({rep['rationalized_examples']} of them rationalized with the answer as a hint, for "
                        f"{rep['rationalized_questions']} questions)" if cfg.rationalize else "")
        log(f"round {rnd + 1}: {rep['questions']} questions (k={k}, T={rep['temperature']}), "
            f"{rep['kept_questions']} solved, {rep['kept_examples']} rationales "
            f"kept{rationalized}, {rep['seconds']} s")
    elapsed = time.perf_counter() - t_run
    summary = build_summary(out_dir, items, state, cfg, round_reports,
                            {"elapsed_s": round(elapsed, 2), "samples": n_samples, "new_tokens": n_tokens,
                             "samples_per_s": round(n_samples / elapsed, 3) if elapsed and n_samples else None,
                             "tokens_per_s": round(n_tokens / elapsed, 2) if elapsed and n_tokens else None})
    return summary


def _rationalize(batch: list[Item], prompts: list, status_rows: list[dict], pool: list[dict], fmt: str, backend,
                 cfg: SynthConfig, state: RunState, reward_fn: Callable | None, params: SamplingParams, rnd: int,
                 temperature: float, chat_on_server: bool) -> dict:
    """STaR rationalization for the questions of ``batch`` that no direct sample solved.

    Each is asked again with its gold answer as a hint (the same exemplars as its direct prompt),
    and its rationales go through the same evaluator (plus the ``hint_free`` stage). Kept ones are
    stored like direct ones: the question without the hint, the hint-free prompt's sha, and
    ``provenance.rationalized: true``; the status record gets a ``rationalization`` block with the
    route's stage counts and the hinted prompt's sha.
    """
    todo = [(it, prompt, status) for it, prompt, status in zip(batch, prompts, status_rows, strict=True)
            if not state.kept_texts.get(it.id) and it.gold is not None and extract_gold(it.gold) is not None]
    got = {"rows": [], "samples": 0, "tokens": 0, "questions": 0}
    if not todo:
        return got
    hints = [rationalization_hint(extract_gold(it.gold)) for it, _, _ in todo]
    hinted = [build_prompt(it.question, pool, k=cfg.shots, fmt=fmt, tokenizer=backend.tokenizer, strategy=cfg.strategy,
                           seed=cfg.seed + 7919 * rnd, render_chat=not chat_on_server, hint=hint)
              for (it, _, _), hint in zip(todo, hints, strict=True)]
    outs = [[_storable(s) for s in samples] for samples in backend.sample(hinted, params)]
    for (it, prompt, status), hint, hprompt, samples in zip(todo, hints, hinted, outs, strict=True):
        got["samples"] += len(samples)
        got["tokens"] += sum(s.n_tokens for s in samples)
        kept, rat, scores = evaluate_question(it, samples, cfg, state.kept_texts.get(it.id, []), reward_fn, hint=hint)
        for i in kept:
            # the hint-free prompt: the stored record must not point at the hint it was drawn with
            got["rows"].append(_kept_row(it, samples[i], i, scores, prompt, backend, cfg, rnd, temperature,
                                         params.seed, hinted=hprompt))
            state.kept_texts.setdefault(it.id, []).append(samples[i].text)
        got["questions"] += bool(kept)
        status["rationalization"] = {"k": params.num_samples, "prompt_sha": hprompt.sha,
                                     "hint_version": HINT_VERSION, **rat}
    return got


def _storable(sample):
    """``sample`` with any lone surrogate in its text replaced by U+FFFD.

    A server's JSON can carry ``\\ud800`` escapes, which decode to lone surrogates: not
    characters, with no UTF-8 form, so the JSONL writer refuses them. A model's text is not the
    user's data to guard, and one odd sample must not stop a long run, so it is repaired here.
    """
    if not _SURROGATES.search(sample.text):
        return sample
    return replace(sample, text=_SURROGATES.sub("\ufffd", sample.text))


def _kept_row(it: Item, sample, index: int, scores: dict, prompt, backend, cfg: SynthConfig, rnd: int,
              temperature: float, seed: int, hinted=None) -> dict:
    """A kept sample as a dataset row. ``hinted``: the prompt with the answer as a hint that drew it
    (rationalization); the row's question and ``prompt_sha`` stay the hint-free ones, and
    ``hinted_prompt_sha`` names the prompt that, with ``seed``, reproduces the sample."""
    answer = extract_answer(sample.text)
    rationale = sample.text.strip()
    # `answer` is a GSM8K-format target (reasoning, then "#### n") so any loader that reads
    # question/answer JSONL, training included, can use the kept set as is.
    body = rationale.rsplit("####", 1)[0].rstrip() if "####" in rationale else rationale
    return {
        "id": it.id, "question": it.question, "rationale": rationale, "answer": f"{body}\n#### {answer}",
        "final_answer": answer, "gold": extract_gold(it.gold) if it.gold is not None else None,
        "scores": {"vote_share": scores["vote_share"][index], "calc": scores["calc"][index],
                   "gold": scores["gold"][index], "reward": scores["reward"][index]},
        "provenance": {"model": backend.model_name, "backend": backend.name, "prompt_sha": prompt.sha, "round": rnd,
                       "seed": seed, "sample_index": index, "temperature": round(temperature, 3),
                       "exemplar_ids": list(prompt.exemplar_ids), "n_tokens": sample.n_tokens,
                       "rationalized": hinted is not None,
                       **({"hinted_prompt_sha": hinted.sha} if hinted is not None else {})},
    }


def _bar(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True)


def build_summary(out_dir: Path, items: list[Item], state: RunState, cfg: SynthConfig, rounds: list[dict],
                  speed: dict) -> dict:
    """Counts at each stage over every round of every run in this directory, plus this run's speed."""
    ids = {it.id for it in items}
    records = [r for r in state.records if r["id"] in ids]
    stages, rat_stages = Counter(), Counter()
    rat_questions = set()
    for r in records:
        stages.update(r["stages"])
        if "rationalization" in r:
            rat_stages.update(r["rationalization"]["stages"])
            rat_questions.add(r["id"])
    last = {}
    for r in records:
        last[r["id"]] = r
    n_done = sum(1 for qid in ids if state.kept_texts.get(qid))
    failed = Counter(r["reason"] for qid, r in last.items() if not state.kept_texts.get(qid)
                     and state.rounds_done.get(qid, 0) >= cfg.rounds)
    n_kept = sum(len(state.kept_texts.get(qid, [])) for qid in ids)
    first_shares = [r["vote_share"] for r in records if r["round"] == 0]
    summary = {
        "questions": len(items), "solved": n_done, "failed": sum(failed.values()), "failed_reasons": dict(failed),
        "pending": len(items) - n_done - sum(failed.values()), "kept_examples": n_kept,
        "stages": {k: stages.get(k, 0) for k in STAGES},
        # the funnel per route: "stages" above is the direct route's, kept here again beside the other
        "routes": dict(zip(ROUTES, ({"questions": len({r["id"] for r in records}),
                                     "stages": {k: stages.get(k, 0) for k in STAGES}},
                                    {"questions": len(rat_questions),
                                     "stages": {k: rat_stages.get(k, 0) for k in RATIONALE_STAGES}}), strict=True)),
        "rounds": rounds, **speed,
        "config": {k: v for k, v in to_dict(cfg).items() if k in ("model", "backend", "served_model", "questions", "k",
                                                                    "rounds", "shots")},
        "dataset": str(out_dir / KEPT), "out_dir": str(out_dir),
    }
    atomic_write_text(out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    if first_shares:
        plot_agreement(first_shares, cfg.min_agreement, out_dir / HIST)
    return summary


def plot_agreement(shares: Sequence[float], min_agreement: float, path: Path) -> None:
    """Histogram of first-round majority shares: how often the k samples agree."""
    from synthtune.plotting import png

    with png(path, (6, 3.5)) as (_, ax):
        ax.hist(shares, bins=[i / 10 for i in range(11)], color="#4c72b0", edgecolor="white")
        ax.axvline(min_agreement, color="#c44e52", linestyle="--", label=f"min_agreement = {min_agreement}")
        ax.set_xlabel("majority vote share (round 1)")
        ax.set_ylabel("questions")
        ax.set_title(f"Self-consistency agreement over {len(shares)} questions")
        ax.legend()

