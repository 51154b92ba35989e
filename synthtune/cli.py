"""The `synthtune` command line. Each command is a thin wrapper over a library function.

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
    synthtune merge --model M --adapter DIR --out DIR
    synthtune score IN.jsonl --out OUT.jsonl [--json]
    synthtune data check FILE.jsonl [--lenient]
    synthtune models prepare NAME | synthtune models info NAME
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from synthtune import __version__
from synthtune.errors import USER_ERRORS

app = typer.Typer(name="synthtune", no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Synthesize reasoning data, fine-tune and evaluate specialist models.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate datasets.")
models_app = typer.Typer(no_args_is_help=True, help="Fetch, build and inspect models.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

# soft_wrap: error lines carry file paths, which must stay whole for editors and grep.
err_console = Console(stderr=True, soft_wrap=True)

OverridesArg = Annotated[list[str] | None, typer.Argument(
    help="config overrides as key=value, e.g. n_questions=3 model=tiny-llama", show_default=False)]


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


@app.command()
@results_on_stdout
def demo(
    overrides: OverridesArg = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config (see configs/demo.yaml)")] = None,
    model: Annotated[str | None, typer.Option(help="HF id, local dir, or built-in name")] = None,
    output_dir: Annotated[str | None, typer.Option(help="where results go")] = None,
) -> None:
    """The README's whole job in one run: synthesize, SFT set, prep, LoRA fine-tune, base vs tuned eval."""
    from synthtune.config import DemoConfig, load_config
    from synthtune.jobs.demo import run_demo

    cfg = load_config(DemoConfig, config, overrides or [], model=model, output_dir=output_dir)
    summary = run_demo(cfg, console=Console(stderr=True))
    emit(json.dumps(summary, indent=2))


@app.command()
@results_on_stdout
def synth(
    overrides: OverridesArg = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML recipe (see configs/synth/)")] = None,
    model: Annotated[str | None, typer.Option(help="HF id, local dir, or built-in name")] = None,
    questions: Annotated[str | None, typer.Option(help="bundled:train, gsm8k:train, hub:train, dir:train or a JSONL")] = None,
    exemplars: Annotated[str | None, typer.Option(help="exemplar pool (never a test split); default: train")] = None,
    k: Annotated[int | None, typer.Option("--k", help="samples per question in round 1")] = None,
    rounds: Annotated[int | None, typer.Option(help="retry rounds for unsolved questions")] = None,
    out: Annotated[str | None, typer.Option(help="output directory (rerun the same command to resume)")] = None,
    backend: Annotated[str | None, typer.Option(help="hf (this process loads the model) or openai (servers)")] = None,
    endpoint: Annotated[list[str] | None, typer.Option(
        help="openai backend: server API base, e.g. http://host:8000/v1 (repeat for several; round-robin)")] = None,
    served_model: Annotated[str | None, typer.Option(help="openai backend: model name on the servers "
                                                     "(default: --model)")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="openai backend: environment variable holding the API "
                                                    "key (never logged or written)")] = None,
    concurrency: Annotated[int | None, typer.Option(help="openai backend: requests in flight at once")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N questions")] = None,
    allow_changed_settings: Annotated[bool, typer.Option(
        "--allow-changed-settings", help="resume --out although sampling settings (k, temperature, stop, ...) "
        "differ from its earlier runs; without it such a rerun is refused")] = False,
    json_only: Annotated[bool, typer.Option("--json", help="print only the JSON summary")] = False,
) -> None:
    """Synthesize rationales: k samples per question, vote, evaluate, keep distinct correct paths."""
    from synthtune.config import SynthConfig, load_config
    from synthtune.synth.pipeline import run_synthesis

    cfg = load_config(SynthConfig, config, overrides or [], model=model, questions=questions, exemplars=exemplars,
                      k=k, rounds=rounds, out=out, backend=backend, endpoints=endpoint or None,
                      served_model=served_model, api_key_env=api_key_env, concurrency=concurrency, limit=limit,
                      allow_changed_settings=allow_changed_settings or None)
    log = (lambda msg: None) if json_only else (lambda msg: err_console.print(Text(msg)))
    summary = run_synthesis(cfg, progress=not json_only, log=log)
    emit(json.dumps(summary, indent=None if json_only else 2))


def _serve_help(key: str) -> str:
    from synthtune.config import ServeConfig, field_help

    return f"{field_help(ServeConfig)[key]} (default {getattr(ServeConfig(), key)})"


@app.command()
@results_on_stdout
def serve(
    model: Annotated[str, typer.Option(help="base model: HF id, local dir, or built-in name")] = "smollm2-135m-instruct",
    adapter: Annotated[list[str] | None, typer.Option(
        help="LoRA adapter as NAME=DIR (or DIR: named after the folder), served as model NAME; repeatable")] = None,
    host: Annotated[str, typer.Option(help="address to bind; keep 127.0.0.1 unless others must reach it")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0 = any free one; the chosen one is printed)")] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="name clients use for the base model "
                                                          "(default: --model)")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="require the key held in this environment variable "
                                                    "(Authorization: Bearer)")] = None,
    max_batch: Annotated[int, typer.Option(help="most prompts generated together in one batch")] = 32,
    batch_window_ms: Annotated[float, typer.Option(help="how long the first request waits for others to batch "
                                                   "with (latency vs batch size)")] = 5.0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (one per core; fewer when sharing "
                                                "the machine)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda...; default cuda when available")] = None,
    seed: Annotated[int, typer.Option(help="seed for built-in tiny models and requests without a seed")] = 0,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with the serve limits below (the flags "
                                                "override it)")] = None,
    max_request_tokens: Annotated[int | None, typer.Option(help=_serve_help("max_request_tokens"))] = None,
    max_inflight_tokens: Annotated[int | None, typer.Option(help=_serve_help("max_inflight_tokens"))] = None,
    max_connections: Annotated[int | None, typer.Option(help=_serve_help("max_connections"))] = None,
    read_timeout: Annotated[float | None, typer.Option(help=_serve_help("read_timeout"))] = None,
    context_length: Annotated[int | None, typer.Option(help=_serve_help("context_length"))] = None,
) -> None:
    """Serve a model and its LoRA adapters over an OpenAI-compatible HTTP API (for local use and tests)."""
    from synthtune.config import ServeConfig, load_config
    from synthtune.jobs.serve import serve as run_serve

    limits = load_config(ServeConfig, config, max_request_tokens=max_request_tokens,
                         max_inflight_tokens=max_inflight_tokens, max_connections=max_connections,
                         read_timeout=read_timeout, context_length=context_length)
    run_serve(model, adapter or [], host=host, port=port, served_name=served_model_name, api_key_env=api_key_env,
              device=device, seed=seed, max_batch=max_batch, batch_window_ms=batch_window_ms, threads=threads,
              limits=limits, log=lambda msg: err_console.print(Text(msg)))


@app.command()
@results_on_stdout
def train(
    overrides: OverridesArg = None,
    config: Annotated[Path | None, typer.Option("--config", help="training recipe (configs/train/*.yaml)")] = None,
    json_only: Annotated[bool, typer.Option("--json", help="print only the JSON summary")] = False,
) -> None:
    """Fine-tune on one process (same recipes as `accelerate launch fine_tune/train.py`)."""
    from synthtune.config import TrainConfig, load_config
    from synthtune.train.loop import exit_status
    from synthtune.train.loop import train as run_train

    cfg = load_config(TrainConfig, config, overrides or [])
    summary = run_train(cfg, progress=not json_only)
    summary.pop("history", None)
    emit(json.dumps(summary, indent=None if json_only else 2))
    if exit_status(summary):  # stopped by SIGTERM/SIGINT after writing a checkpoint
        raise typer.Exit(exit_status(summary))


@app.command()
@results_on_stdout
def prep(
    model: Annotated[str, typer.Option(help="HF id, local dir, or built-in name (only its tokenizer is loaded)")],
    data: Annotated[str, typer.Option(help="bundled:train, gsm8k:train, hub:train, dir:train or a JSONL")],
    fmt: Annotated[str, typer.Option("--format", help="plain, chat, or auto (chat when the model has a template)")]
    = "auto",
    max_length: Annotated[int, typer.Option(help="longest example (seq2seq: encoder input) in tokens")] = 512,
    max_target_length: Annotated[int | None, typer.Option(help="seq2seq labels limit; default max-length")] = None,
    truncation: Annotated[str, typer.Option(help="drop over-long examples, or truncate them (cuts the answer)")]
    = "drop",
    out: Annotated[str | None, typer.Option(help="output dir; default outputs/prep/<model>_<data>_<fmt>_<len>")]
    = None,
    limit: Annotated[int | None, typer.Option(help="only the first N rows")] = None,
    json_only: Annotated[bool, typer.Option("--json", help="print only the one-line JSON summary")] = False,
) -> None:
    """Tokenize data for fine-tuning: label masks, length stats, histogram, and a saved arrow dataset."""
    from synthtune.jobs.prep import run_prep

    try:
        summary = run_prep(model, data, fmt=fmt, max_length=max_length, max_target_length=max_target_length,
                           truncation=truncation, out=out, limit=limit)
    except ValueError as err:
        if type(err) is not ValueError:  # DataError and friends print through main()
            raise
        raise typer.BadParameter(str(err)) from err
    if not json_only:
        err_console.print(Text(f"{summary['n_kept']} of {summary['n']} examples -> {summary['dataset']}; "
                               f"p99 {summary['p99']} tokens, recommended max_length "
                               f"{summary['recommended_max_length']}"))
    emit(json.dumps(summary, indent=None if json_only else 2))


@app.command()
@results_on_stdout
def memory(
    model: Annotated[str, typer.Option(help="HF id, local dir, config.json path, or built-in name")] = "smollm2-135m-instruct",
    method: Annotated[str, typer.Option(help="full | lora | qlora (4-bit base)")] = "full",
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    lora_targets: Annotated[str, typer.Option(help="comma list of module names (q,v) or all-linear")] = "q,v",
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout (>0 keeps a mask and an input copy per adapter)")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="micro-batch per GPU")] = 8,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence (seq2seq: encoder length)")] = 256,
    target_len: Annotated[int | None, typer.Option(help="seq2seq decoder length (default: seq-len)")] = None,
    grad_ckpt: Annotated[bool, typer.Option("--grad-ckpt/--no-grad-ckpt", help="gradient checkpointing (~30% slower)")] = False,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 (bf16 weights) | bf16-mixed (fp32 weights + autocast)")] = "bf16-mixed",
    optimizer: Annotated[str, typer.Option(help="adamw | adamw-8bit | sgd")] = "adamw",
    zero_stage: Annotated[int, typer.Option(help="DeepSpeed ZeRO stage 0..3")] = 0,
    offload: Annotated[str, typer.Option(help="none | optimizer | all (ZeRO offload to CPU)")] = "none",
    gpus: Annotated[int, typer.Option(help="GPUs per node")] = 1,
    nodes: Annotated[int, typer.Option(help="nodes")] = 1,
    attn: Annotated[str, typer.Option(help="sdpa | flash | eager (eager keeps S x S probabilities)")] = "sdpa",
    persistence_threshold: Annotated[int, typer.Option(
        help="ZeRO-3: parameters of at most this many elements stay whole on every GPU "
             "(DeepSpeed's stage3_param_persistence_threshold)")] = 100_000,
    fit: Annotated[bool, typer.Option("--fit", help="search method/ZeRO/ckpt/micro-batch for the fastest setup that fits")] = False,
    gpu_gib: Annotated[float, typer.Option(help="--fit: memory per GPU, GiB")] = 80.0,
    headroom: Annotated[float, typer.Option(help="--fit: fraction kept free for the allocator's fragmentation")] = 0.1,
    cpu_gib: Annotated[float | None, typer.Option(help="--fit: host RAM per node, GiB (enables offload options)")] = None,
    global_batch: Annotated[int | None, typer.Option(help="--fit: sequences per optimizer step (sets gradient accumulation)")] = None,
    train_config: Annotated[str, typer.Option(help="--fit: training recipe named in the printed command")] = "configs/train/X.yaml",
    trust_remote_code: Annotated[bool, typer.Option(help="allow the model repo's own Python code to run")] = False,
    json_only: Annotated[bool, typer.Option("--json", help="print only the JSON object")] = False,
) -> None:
    """Estimate peak GPU memory per GPU for a training setup, or --fit the fastest setup that fits."""
    from synthtune.memory.estimate import Setup, estimate
    from synthtune.memory.fit import fit as fit_search
    from synthtune.memory.report import estimate_json, print_estimate, print_fit
    from synthtune.memory.shape import load_shape

    setup = Setup(method=method, lora_r=lora_r, lora_targets=lora_targets, lora_dropout=lora_dropout,
                  precision=precision, optimizer=optimizer, zero_stage=zero_stage, offload=offload, gpus=gpus,
                  nodes=nodes, batch_size=batch_size, seq_len=seq_len, target_len=target_len, grad_ckpt=grad_ckpt,
                  attn=attn, persistence_threshold=persistence_threshold)
    try:
        setup.check()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    shape = load_shape(model, trust_remote_code=trust_remote_code)
    if fit:
        result = fit_search(shape, setup, gpu_gib, headroom=headroom, cpu_gib=cpu_gib, global_batch=global_batch,
                            train_config=train_config)
        if not json_only:
            print_fit(result, err_console)
        emit(json.dumps(result, indent=None if json_only else 2))
        return
    est = estimate(shape, setup)
    if not json_only:
        print_estimate(est, err_console)
    emit(json.dumps(estimate_json(est), indent=None if json_only else 2))


@app.command()
@results_on_stdout
def infer(
    model: Annotated[str, typer.Option(help="base model: HF id, local dir, or built-in name")],
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter dir (a training run's final/)")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="a question (repeatable)")] = None,
    input: Annotated[str | None, typer.Option("--input", help="JSONL with a question field")] = None,
    out: Annotated[str | None, typer.Option(help="write results as JSONL here")] = None,
    k: Annotated[int, typer.Option("--k", help="samples per question (1 = greedy)")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="generation budget")] = 256,
    prompt_format: Annotated[str, typer.Option("--format", help="plain or chat: what training used")] = "plain",
    json_only: Annotated[bool, typer.Option("--json", help="print results as JSON lines only")] = False,
) -> None:
    """Answer questions with a model and its LoRA adapter, in the prompt format training used."""
    from synthtune.jobs.infer import infer as run_infer

    rows = run_infer(model, adapter=adapter, prompts=prompt, input_path=input, out_path=out, k=k,
                     max_new_tokens=max_new_tokens, fmt=prompt_format, progress=not json_only)
    for r in rows:
        if not json_only:
            err_console.print(Text(f"Q: {r['question']}\nA: {r['completions'][0]}\n", style="cyan"))
        emit(json.dumps(r))


@app.command("eval")
@results_on_stdout
def eval_cmd(
    overrides: OverridesArg = None,
    model: Annotated[str | None, typer.Option(help="base model: HF id, local dir, or built-in name")] = None,
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter dir (a training run's final/)")] = None,
    split: Annotated[str | None, typer.Option(help="train or test")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N questions")] = None,
    shots: Annotated[int | None, typer.Option(help="0 (training format) or 8 (exemplars from train)")] = None,
    k: Annotated[int | None, typer.Option("--k", help="samples per question (1 = greedy)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for exemplars and sampling")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="base and base+adapter side by side")] = False,
    out: Annotated[str | None, typer.Option(help="output directory")] = None,
    json_only: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
) -> None:
    """GSM8K accuracy by generation: strict and flexible accuracy, parse rate, maj@k; --compare."""
    from synthtune.config import EvalConfig, load_config
    from synthtune.jobs.eval import comparison_table, run_eval

    cfg = load_config(EvalConfig, None, overrides or [], model=model, adapter=adapter, split=split, limit=limit,
                      shots=shots, k=k, seed=seed, out=out, compare=compare or None)
    report = run_eval(cfg, progress=not json_only)
    if not json_only:
        err_console.print(comparison_table(report))
    emit(json.dumps(report, indent=None if json_only else 2))


@app.command()
@results_on_stdout
def merge(
    model: Annotated[str, typer.Option(help="the adapter's base model")],
    adapter: Annotated[str, typer.Option(help="LoRA adapter dir (a training run's final/)")],
    out: Annotated[str, typer.Option(help="new directory for the merged model")],
    atol: Annotated[float, typer.Option(help="largest allowed logit difference vs the adapter model")] = 1e-4,
) -> None:
    """Merge a LoRA adapter into its base (merge_and_unload), save safetensors, verify the logits."""
    from synthtune.jobs.merge import merge_adapter

    emit(json.dumps(merge_adapter(model, adapter, out, atol=atol), indent=2))


@app.command()
@results_on_stdout
def score(
    input: Annotated[Path, typer.Argument(help="JSONL rows with question, answer, completions (or completion)")],
    out: Annotated[Path, typer.Option("--out", help="where the scored JSONL is written")],
    json_only: Annotated[bool, typer.Option("--json", help="print only the one-line JSON summary")] = False,
    lenient: Annotated[bool, typer.Option(help="skip malformed rows (and report how many) instead of failing")] = False,
) -> None:
    """Score any model's GSM8K outputs: extraction, correctness, majority vote, maj@k and pass@k."""
    from synthtune.jobs.score import score_file

    summary = score_file(input, out, lenient=lenient)
    if not json_only:
        err_console.print(f"scored {summary['n_questions']} questions -> {out}")
    emit(json.dumps(summary))


@data_app.command("check")
@results_on_stdout
def data_check(
    path: Annotated[Path, typer.Argument(help="JSONL with question and answer fields (GSM8K format)")],
    lenient: Annotated[bool, typer.Option(help="skip malformed rows (and report them) instead of failing")] = False,
    json_only: Annotated[bool, typer.Option("--json", help="print only the JSON summary")] = False,
) -> None:
    """Validate a GSM8K-format file: fields, final answers, and every calculator annotation."""
    from synthtune.data.validate import check_file

    report = check_file(path, lenient=lenient)
    if not json_only:
        for line in report.pop("problems_preview", []):
            err_console.print(Text(line, style="yellow"))
    else:
        report.pop("problems_preview", None)
    emit(json.dumps(report))


@models_app.command("prepare")
@results_on_stdout
def models_prepare(
    name: Annotated[str, typer.Argument(help="smollm2-135m-instruct, tiny-llama, tiny-t5, an HF id or a dir")],
    seed: Annotated[int, typer.Option(help="seed for the tiny models")] = 0,
) -> None:
    """Fetch/convert/build a model once (useful before going offline); prints its local path."""
    from synthtune.models import resolve_model

    emit(resolve_model(name, seed=seed))


@models_app.command("info")
@results_on_stdout
def models_info(
    name: Annotated[str, typer.Argument(help="smollm2-135m-instruct, tiny-llama, tiny-t5, an HF id or a dir")],
    trust_remote_code: Annotated[bool, typer.Option(help="allow the model repo's own Python code to run")] = False,
) -> None:
    """Print a model's kind (causal or seq2seq), size and the dtype/device it would load with."""
    from synthtune.models import model_info

    emit(json.dumps(model_info(name, trust_remote_code=trust_remote_code), indent=2))


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
