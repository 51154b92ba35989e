"""The `synthtune` command line: a router from each command to its job in ``synthtune/jobs/``.

Each command parses its options into its config dataclass (``synthtune/config.py``), runs the
job and prints the result. The options are generated from the dataclass (``cli_options.py``):
every field is an option with the field's help, and every command also takes ``--config
FILE.yaml`` and ``key=value`` overrides (precedence: defaults < YAML < key=value < options).

    synthtune --help
    synthtune demo [--config configs/demo.yaml] [key=value ...]
    synthtune synth --model M --questions SRC [--exemplars SRC] --k 8 --rounds 2 --out DIR [--config X.yaml]
                    [--allow-changed-settings]
    synthtune synth --backend openai --endpoint URL [--endpoint URL ...] --served-model NAME [--api-key-env VAR]
    synthtune serve --model M [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000]
    synthtune prep --model M --data SRC [--max-length N] [--out DIR]
    synthtune train --config configs/train/smoke.yaml [key=value ...]
    synthtune memory --model M --method lora ... [--fit --gpu-gib 40 --gpus 4] [--json]
    synthtune infer --model M [--adapter DIR] (--prompt TEXT | --input FILE.jsonl) [--k N] [--json]
    synthtune eval --model M [--adapter DIR] [--split test] [--limit N] [--shots 0|8] [--k 1] [--compare]
    synthtune merge [--model M] --adapter DIR --out DIR
    synthtune check-vllm DIR --max-lora-rank 16
    synthtune score IN.jsonl --out OUT.jsonl [--json]
    synthtune data check FILE.jsonl [--lenient]
    synthtune models prepare NAME | synthtune models info NAME
    synthtune env [--json]
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import traceback
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from synthtune import __version__
from synthtune import config as C
from synthtune.cli_options import config_command
from synthtune.errors import USER_ERRORS

app = typer.Typer(name="synthtune", no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Synthesize reasoning data, fine-tune and evaluate specialist models.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate datasets.")
models_app = typer.Typer(no_args_is_help=True, help="Fetch, build and inspect models.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

# soft_wrap: error lines carry file paths, which must stay whole for editors and grep.
err_console = Console(stderr=True, soft_wrap=True)

_result_streams: list = []


def results_on_stdout(fn):
    """Keep stdout for the command's result (JSON, a path); send everything else to stderr.

    Libraries print to stdout on their own: DeepSpeed's logger binds ``sys.stdout`` when it is
    imported (accelerate imports it inside ``save_pretrained``), which would corrupt ``--json``
    output. Inside the command, stdout is stderr; ``emit`` writes to the real stdout.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _result_streams.append(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return fn(*args, **kwargs)
        finally:
            _result_streams.pop()

    return wrapper


def emit(text: str) -> None:
    print(text, file=_result_streams[-1] if _result_streams else sys.stdout, flush=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"synthtune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                 help="print the version and exit")] = False,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    # Logging is configured here, in the entry point, never at import time.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_log_redaction()


def install_log_redaction() -> None:
    """Redact API keys from every record the root logger's handlers print (libraries log too)."""
    from synthtune.redact import RedactingFilter

    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def say(text: str, style: str | None = None) -> None:
    """A line for people, on stderr (stdout carries the result). Text, not markup: it may hold brackets."""
    err_console.print(Text(text, style=style))


@config_command(app, "demo", C.DemoConfig)
@results_on_stdout
def demo(cfg: C.DemoConfig) -> None:
    """The README's whole job in one run: synthesize, SFT set, prep, LoRA fine-tune, base vs tuned eval."""
    from synthtune.jobs import demo as job

    emit(json.dumps(job.run(cfg, console=Console(stderr=True)), indent=2))


@config_command(app, "synth", C.SynthConfig, json_switch=True)
@results_on_stdout
def synth(cfg: C.SynthConfig, json_only: bool) -> None:
    """Synthesize rationales: k samples per question, vote, evaluate, keep distinct correct paths."""
    from synthtune.jobs import synth as job

    summary = job.run(cfg, progress=not json_only, log=(lambda msg: None) if json_only else say)
    emit(json.dumps(summary, indent=None if json_only else 2))


@config_command(app, "serve", C.ServeConfig)
@results_on_stdout
def serve(cfg: C.ServeConfig) -> None:
    """Serve a model and its LoRA adapters over an OpenAI-compatible HTTP API (for local use and tests)."""
    from synthtune.jobs import serve as job

    job.run(cfg, log=say)


@config_command(app, "train", C.TrainConfig, json_switch=True)
@results_on_stdout
def train(cfg: C.TrainConfig, json_only: bool) -> None:
    """Fine-tune on one process (same recipes as `accelerate launch fine_tune/train.py`)."""
    from synthtune.jobs import train as job

    summary, status = job.run(cfg, progress=not json_only)
    emit(json.dumps(summary, indent=None if json_only else 2))
    if status:  # stopped by SIGTERM/SIGINT after writing a checkpoint
        raise typer.Exit(status)


@config_command(app, "prep", C.PrepConfig, json_switch=True)
@results_on_stdout
def prep(cfg: C.PrepConfig, json_only: bool) -> None:
    """Tokenize data for fine-tuning: label masks, length stats, histogram, and a saved arrow dataset."""
    from synthtune.jobs import prep as job

    summary = job.run(cfg)
    if not json_only:
        say(f"{summary['n_kept']} of {summary['n']} examples -> {summary['dataset']}; p99 {summary['p99']} tokens, "
            f"recommended max_length {summary['recommended_max_length']}")
    emit(json.dumps(summary, indent=None if json_only else 2))


@config_command(app, "memory", C.MemoryConfig, json_switch=True)
@results_on_stdout
def memory(cfg: C.MemoryConfig, json_only: bool) -> None:
    """Estimate peak GPU memory per GPU for a training setup, or --fit the fastest setup that fits."""
    from synthtune.jobs import memory as job

    result = job.run(cfg, console=None if json_only else err_console)
    emit(json.dumps(result, indent=None if json_only else 2))


@config_command(app, "infer", C.InferConfig, json_switch=True)
@results_on_stdout
def infer(cfg: C.InferConfig, json_only: bool) -> None:
    """Answer questions with a model and its LoRA adapter, in the prompt format training used."""
    from synthtune.jobs import infer as job

    for row in job.run(cfg, progress=not json_only):
        if not json_only:
            say(f"Q: {row['question']}\nA: {row['completions'][0]}\n", style="cyan")
        emit(json.dumps(row))


@config_command(app, "eval", C.EvalConfig, json_switch=True)
@results_on_stdout
def eval_cmd(cfg: C.EvalConfig, json_only: bool) -> None:
    """GSM8K accuracy by generation: ours by value, lm-eval's gsm8k figures beside them, maj@k; --compare."""
    from synthtune.jobs import eval as job

    report = job.run(cfg, progress=not json_only)
    if not json_only:
        err_console.print(job.comparison_table(report))
    emit(json.dumps(report, indent=None if json_only else 2))


@config_command(app, "merge", C.MergeConfig)
@results_on_stdout
def merge(cfg: C.MergeConfig) -> None:
    """Merge a LoRA adapter into its base (merge_and_unload), save safetensors, verify the logits."""
    from synthtune.jobs import merge as job

    emit(json.dumps(job.run(cfg, log=say), indent=2))


def _report(result: dict, table, json_only: bool) -> None:
    """A report as a table on stderr for people (unless --json), and as JSON on stdout for machines."""
    if not json_only:
        err_console.print(table(result))
    emit(json.dumps(result, indent=None if json_only else 2))


@config_command(app, "check-vllm", C.CheckVllmConfig, json_switch=True)
@results_on_stdout
def check_vllm(cfg: C.CheckVllmConfig, json_only: bool) -> None:
    """Check a LoRA adapter against vLLM's LoRA rules (rank, modules_to_save, DoRA, bias, targets); exit 1 if one fails."""
    from synthtune.jobs import check_vllm as job

    report = job.run(cfg)
    _report(report, job.table, json_only)
    if not report["ok"]:
        raise typer.Exit(1)


@config_command(app, "score", C.ScoreConfig, json_switch=True)
@results_on_stdout
def score(cfg: C.ScoreConfig, json_only: bool) -> None:
    """Score any model's GSM8K outputs: extraction, correctness, majority vote, maj@k, pass@k, lm-eval's gsm8k figures."""
    from synthtune.jobs import score as job

    summary = job.run(cfg)
    if not json_only:
        say(f"scored {summary['n_questions']} questions -> {cfg.out}")
    emit(json.dumps(summary))


@config_command(data_app, "check", C.DataCheckConfig, json_switch=True)
@results_on_stdout
def data_check(cfg: C.DataCheckConfig, json_only: bool) -> None:
    """Validate a GSM8K-format file: fields, final answers, and every calculator annotation."""
    from synthtune.jobs import data as job

    report = job.check(cfg)
    for line in report.pop("problems_preview", []):
        if not json_only:
            say(line, style="yellow")
    emit(json.dumps(report))


@config_command(models_app, "prepare", C.ModelsPrepareConfig)
@results_on_stdout
def models_prepare(cfg: C.ModelsPrepareConfig) -> None:
    """Fetch/convert/build a model once (useful before going offline); prints its local path."""
    from synthtune.jobs import models as job

    emit(job.prepare(cfg))


@config_command(models_app, "info", C.ModelsInfoConfig)
@results_on_stdout
def models_info(cfg: C.ModelsInfoConfig) -> None:
    """Print a model's kind (causal or seq2seq), size and the dtype/device it would load with."""
    from synthtune.jobs import models as job

    emit(json.dumps(job.info(cfg), indent=2))


@config_command(app, "env", C.EnvConfig, json_switch=True)
@results_on_stdout
def env(cfg: C.EnvConfig, json_only: bool) -> None:
    """Print what a bug report needs: versions, GPUs, paths, and installed packages against poetry.lock."""
    from synthtune.jobs import env as job

    _report(job.run(cfg), job.table, json_only)


def main() -> None:
    """Console entry point: known user errors print one clear message, not a traceback.

    Nothing printed here carries an API key: messages and tracebacks go through ``redact``.
    """
    from synthtune.redact import has_secrets, redact

    try:
        app()
    except USER_ERRORS as err:
        # Text, not markup: messages may hold brackets (e.g. "openai/gsm8k[test]").
        err_console.print(Text.assemble(("error: ", "bold red"), redact(str(err))))
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: everything written so far is kept")
        sys.exit(130)
    except Exception as err:
        if not has_secrets():
            raise  # typer's traceback, as usual
        # a bug's traceback once a key was read: plain text, so every line can be redacted
        # (typer's rich traceback prints each exception's message as it is)
        err_console.print(Text(redact("".join(traceback.format_exception(type(err), err, err.__traceback__)))))
        sys.exit(1)


if __name__ == "__main__":
    main()
