"""The training loop, on accelerate: one process on a laptop, DDP, DeepSpeed ZeRO or FSDP at scale.

Gradient accumulation is done per *window* of micro-batches: the window's label tokens are
counted (across all ranks) before its backward passes, and each micro-batch's summed token loss
is divided by that count. So the update equals one big batch of the same tokens, however the
tokens fall into micro-batches (the mean-of-means bug that per-micro-batch averaging has).
Windows never straddle an epoch end: the few batches that do not fill a last window are left
for the next epoch's reshuffle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

from synthtune.config import TrainConfig, save_config, to_dict
from synthtune.errors import ConfigError
from synthtune.files import atomic_write_text
from synthtune.memory.estimate import Setup, estimate
from synthtune.memory.partitions import ModelStateProbe
from synthtune.memory.shape import load_shape
from synthtune.memory.trace import MemoryTracer
from synthtune.models import (
    describe_base,
    is_seq2seq_config,
    load_config,
    load_tokenizer,
    resolve_model,
    zero3_init,
    zero3_init_flag,
)
from synthtune.train import checkpoint as ckpt
from synthtune.train.data import build_train_data
from synthtune.train.loss import batch_tokens, label_tokens, step_loss_sum
from synthtune.train.metrics import evaluate
from synthtune.train.plots import plot_history
from synthtune.train.setup import (
    apply_lora,
    deepspeed_cpu_process_group,
    default_output_dir,
    model_class,
    on_cuda,
    raise_if_any_rank_failed,
    require_deepspeed,
    resolve_attention,
    resolve_packing_mode,
    resolve_precision,
    resolve_tracker,
    trainable_parameters,
    validation_problem,
    zero3_partitions,
)

logger = logging.getLogger(__name__)


class StopRequests:
    """SIGTERM (a scheduler preempting the job) or SIGINT (Ctrl-C) asks the loop to stop cleanly.

    The loop finishes the optimizer step it is in, writes a checkpoint and returns, so
    ``resume_from=latest`` continues with nothing lost. A Ctrl-C after any pending request stops
    at once (the checkpoint is then the last one saved). Repeated SIGTERMs are one request: a
    launcher may forward the signal its process group already got. Only the training steps are
    covered: a signal during the final evaluation or save has its default effect. Handlers can
    only be set from the main thread; elsewhere (a worker thread) signals keep their default
    behaviour. Under torchrun (``accelerate launch``) the agent kills the workers
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (default 30) after forwarding a signal.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    @property
    def asked(self) -> int:
        """1 if this process was asked to stop, else 0 (summed over ranks by the loop)."""
        return int(self.signum is not None)

    def any_rank(self, sums: HostSums) -> bool:
        """Whether any process was asked to stop (a collective: every rank must call it)."""
        (asked,) = sums.reduce([self.asked])
        if asked:
            self.agree(sums)
        return bool(asked)

    def agree(self, sums: HostSums) -> None:
        """Once some rank was asked (every rank calls this): all take the same signal, the highest
        number, so they report it and exit with the same status."""
        (top,) = sums.reduce([self.signum or 0], op="max")
        self.signum = top or signal.SIGTERM

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None


class HostSums:
    """Sums (or maxima) of a few host integers over all ranks, without touching the accelerator.

    The loop needs some numbers from every rank at each step (the window's label tokens, which
    normalize the loss before its backward; whether a rank was asked to stop). Reduced as device
    tensors, each makes the CPU wait until the GPU has run everything queued so far, and the CPU
    then queues the next kernels late. These are host numbers, so they go through a CPU (gloo)
    process group instead: the call waits for the other ranks' CPUs, never for a GPU. Where the
    default group is already gloo (CPU runs) it is used as is; one process needs no collective.
    """

    def __init__(self, world: int, device=None, host: bool = True):
        self.world, self.group, self.device = world, None, None
        if world > 1:
            import torch.distributed as dist

            if dist.get_backend() != "gloo":
                if host:
                    # every rank creates it, in the same order (a collective itself), once per run
                    self.group = dist.new_group(backend="gloo")
                else:  # host_collectives=false: the default (GPU) group, at one device sync per call
                    self.device = device

    def reduce(self, values: list[int], op: str = "sum") -> list[int]:
        if self.world == 1:
            return [int(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64, device=self.device)  # device None: the CPU, for gloo
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return t.tolist()


def exit_status(result: dict) -> int:
    """The process exit status for a train() result: 128 + the signal that stopped it, else 0."""
    name = result.get("stopped_by")
    return 128 + signal.Signals[name].value if name in signal.Signals.__members__ else 0


def persistence_threshold(plugin) -> int:
    """The run's stage3_param_persistence_threshold (accelerate fills an "auto" one at prepare)."""
    value = (plugin.deepspeed_config.get("zero_optimization", {}) if plugin is not None else {}).get(
        "stage3_param_persistence_threshold", 100_000)  # DeepSpeed's default when unset
    return int(value) if isinstance(value, (int, float)) else 100_000


def predicted_memory(cfg: TrainConfig, prec, acc, stats: dict, attn: str | None = None) -> dict | None:
    """The estimator's per-GPU peak for this very run, to sit beside the measured peak.

    The longest training example sets the largest batch shape, so it is the sequence length
    used. On CPU the number is what a GPU would need for the same run.
    """
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    precision = "fp32" if prec.mixed_precision == "no" and prec.weights_dtype == "fp32" else (
        "bf16" if prec.weights_dtype == "bf16" else "bf16-mixed")
    train_stats = stats.get("train", {})
    seq = int(cfg.max_length if cfg.packing else train_stats.get("max", cfg.max_length))
    target = train_stats.get("target", {}).get("max")
    try:
        setup = Setup(method=cfg.method, lora_r=cfg.lora_r, lora_targets=",".join(cfg.lora_targets),
                      lora_dropout=cfg.lora_dropout, precision=precision,
                      zero_stage=getattr(plugin, "zero_stage", 0) if plugin else 0, gpus=acc.num_processes,
                      batch_size=cfg.per_device_batch_size, seq_len=max(seq, 1), target_len=target,
                      grad_ckpt=cfg.gradient_checkpointing, persistence_threshold=persistence_threshold(plugin),
                      # flex and flash-attn are fused kernels that keep what flash keeps (q, k, v, out, lse)
                      attn={"eager": "eager", "flash_attention_2": "flash", "flex_attention": "flash"}.get(attn, "sdpa"),
                      loss_impl=cfg.loss_impl)
        est = estimate(load_shape(cfg.model, trust_remote_code=cfg.trust_remote_code), setup)
    except (ValueError, KeyError, NotImplementedError) as err:  # an architecture it does not model
        logger.warning("memory estimate unavailable: %s", err)
        return None
    return {"per_gpu_gib": round(est.per_gpu_gib, 3), "seq_len": seq, "precision": precision,
            "model_states_bytes": est.model_states_bytes}


def load_for_training(cfg: TrainConfig, weights_dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model(cfg.model, seed=cfg.seed)
    mcfg = load_config(path, trust_remote_code=cfg.trust_remote_code)
    seq2seq = is_seq2seq_config(mcfg)
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    kwargs = {"dtype": torch.bfloat16 if weights_dtype == "bf16" else torch.float32,
              "trust_remote_code": cfg.trust_remote_code}
    attn = resolve_attention(cfg, *on_cuda(cfg), model_class(mcfg, seq2seq), seq2seq)
    if attn is not None:  # None: transformers' default (sdpa where the model has it)
        kwargs["attn_implementation"] = attn
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    if cfg.random_init:
        # Built whole, directly on the GPU when one is used (a 20B shape never touches host
        # memory), and outside deepspeed.zero.Init: under it from_config skips weight init, so
        # the "random" base is uninitialized memory and LoRA on top of it did not learn (the
        # H200 check). DeepSpeed shards the model at prepare instead.
        from accelerate.state import PartialState

        device = PartialState().device
        with zero3_init(False), torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            model = cls.from_config(mcfg, dtype=kwargs["dtype"], trust_remote_code=cfg.trust_remote_code,
                                    **({"attn_implementation": attn} if attn else {}))
    else:
        with zero3_init(zero3_init_flag()):
            model = cls.from_pretrained(path, **kwargs)
    tok_path = resolve_model(cfg.tokenizer, seed=cfg.seed) if cfg.tokenizer else path
    tok = load_tokenizer(tok_path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        # Labels are masked by position, never by pad id, so pad == eos is safe here.
        tok.pad_token = tok.eos_token
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method == "lora":
            # frozen embeddings produce no grad; checkpointed blocks then see inputs that need none
            model.enable_input_require_grads()
    model.config.use_cache = False
    if cfg.method in ("lora", "qlora"):
        model = apply_lora(model, cfg, seq2seq)
    return model, tok, seq2seq, path


def train(cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Run (or resume) training; returns the summary also written to ``summary.json``."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    problem = validation_problem(cfg)  # launched ranks raise it together, after the group is up
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
    cfg = replace(cfg, output_dir=str(out_dir))
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if use_cpu:
        # DeepSpeed (imported by peft/accelerate when saving) otherwise probes for an accelerator
        # and warns "unable to detect" a GPU on every CPU run; CPU is the answer either way.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    prec = resolve_precision(cfg, not use_cpu, (not use_cpu) and torch.cuda.is_bf16_supported())
    G = cfg.gradient_accumulation_steps
    # Accelerator(cpu=True) drops a DeepSpeed launcher config and runs plain (DDP) training; under
    # `accelerate launch` with DeepSpeed, its CPU accelerator (DS_ACCELERATOR=cpu) runs ZeRO on CPU.
    # (On a GPU machine, device=cpu keeps accelerate's CPU semantics: DeepSpeed would pick the GPU.)
    require_deepspeed()
    tracker = resolve_tracker(cfg.log_with)
    deepspeed_on_cpu = (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
                        and not torch.cuda.is_available())
    # Several DeepSpeed ranks on CPU need the process group's backend named, or accelerate counts
    # one process per rank (see deepspeed_cpu_process_group); None on GPUs.
    ds_group = deepspeed_cpu_process_group() if deepspeed_on_cpu else None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # DeepSpeed's ZeRO collectives call torch's deprecated names: a warning per call per rank
        # (hundreds a run) that no user setting can fix
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_"
                                r"tensor)` is deprecated", category=FutureWarning)
    acc = Accelerator(
        mixed_precision=prec.mixed_precision, cpu=use_cpu and not deepspeed_on_cpu,
        kwargs_handlers=[ds_group] if ds_group is not None else None,
        # The loop steps the scheduler itself, once per optimizer step. accelerate's own rule steps
        # it num_processes times per step (it assumes a schedule counted on the unsharded data),
        # and under DeepSpeed prepare() hands it back unwrapped, stepping on every micro-batch.
        step_scheduler_with_optimizer=False,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=G, sync_with_dataloader=False,
                                                                adjust_scheduler=False),
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")))
    raise_if_any_rank_failed(acc, problem)
    main = acc.is_main_process
    say = (lambda m: tqdm.write(f"[train] {m}")) if main else (lambda m: None)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    set_seed(cfg.seed)

    tracer = None
    if cfg.trace_memory and main:
        tracer = MemoryTracer(out_dir, interval_s=0.5)
        tracer.start()

    t0 = time.perf_counter()
    model, tok, seq2seq, model_path = load_for_training(cfg, prec.weights_dtype)
    n_train, n_total = trainable_parameters(model)
    # what the model runs, which transformers may have chosen (auto): the packed layout follows it
    attn = model.config._attn_implementation
    packing_mode = resolve_packing_mode(cfg, attn)
    say(f"{cfg.model} ({'seq2seq' if seq2seq else 'causal'}), method={cfg.method}, precision={cfg.precision} "
        f"-> weights {prec.weights_dtype}, autocast {prec.mixed_precision}; trainable {n_train:,} / {n_total:,} "
        f"({100 * n_train / n_total:.2f}%), {acc.num_processes} process(es) on {acc.device}; attention {attn}"
        + (f", packed rows apart by {packing_mode}" if packing_mode else ""))

    data, problem = None, None
    with acc.main_process_first():
        try:
            data = build_train_data(cfg, tok, seq2seq, mask_bf16="bf16" in (prec.weights_dtype, prec.mixed_precision),
                                    packing_mode=packing_mode or "mask")
        except (ValueError, OSError) as err:  # bad rows, unreadable files (ConfigError and DataError are ValueErrors)
            # raised alone, this rank would leave the others waiting in the next collective until the
            # process group's timeout (30 min); the barrier below and the agreement make every rank stop
            problem = err
    raise_if_any_rank_failed(acc, problem)
    for line in data.report_lines():
        say(line)
    train_dl, eval_dl = data.train_loader, data.eval_loader

    params = [p for p in model.parameters() if p.requires_grad]
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if cfg.loss_impl == "chunked" and (acc.distributed_type.value == "FSDP" or getattr(plugin, "zero_stage", 0) == 3):
        # every rank raises it, before any collective of the run
        raise ConfigError("loss_impl: chunked applies the lm_head outside the model's forward, where FSDP and "
                          "ZeRO-3 have released its gathered weight; use loss_impl: standard with them")
    if plugin is not None:
        # accelerate's clip_grad_norm_ is a no-op under DeepSpeed: the engine clips, from its config.
        plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.compile:
        model = torch.compile(model)
    model, opt, train_dl = acc.prepare(model, opt, train_dl)
    # FSDP2 replaces every parameter with a sharded one at prepare: clipping the old objects
    # (no gradients) clipped nothing, silently
    params = [p for p in model.parameters() if p.requires_grad]
    states_probe = ModelStateProbe(opt)  # what each rank holds, beside the estimate in summary.json
    partitions = zero3_partitions(acc, model)
    if partitions:
        full = max(partitions[0]["full_numel"], 1)
        shares = ", ".join(f"{r['local_numel'] / full:.1%}" for r in partitions)
        say(f"ZeRO-3 partitions: the ranks hold {shares} of the {full:,} parameter elements, and "
            f"{partitions[0]['persistent_numel'] / full:.1%} whole "
            f"(at most stage3_param_persistence_threshold elements)")
    if cfg.method in ("lora", "qlora"):
        ckpt.adapter_only_checkpoints(acc, model)
    save_kw, load_kw = ckpt.deepspeed_state_kwargs(acc, adapter_only=cfg.method in ("lora", "qlora"))
    if eval_dl is not None:
        eval_dl = acc.prepare(eval_dl)
    # Counted on the unsharded batches: a step takes G batches on each of the world ranks. The
    # sharded loader pads the shorter ranks' shards with repeats of the epoch's first batches (so
    # every rank runs the same number of forwards); counting its length instead would train on
    # those repeats, which one process on the same global batch never sees.
    windows_per_epoch = len(data.train_loader) // (G * acc.num_processes)
    if windows_per_epoch == 0:
        raise ConfigError(f"gradient_accumulation_steps: {len(data.train_loader)} batches of "
                          f"{cfg.per_device_batch_size} cannot fill one accumulation window of {G} on each of "
                          f"{acc.num_processes} process(es); lower gradient_accumulation_steps or per_device_batch_size")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * windows_per_epoch)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps,
                          num_training_steps=total_steps)
    # Not prepared or registered: the schedule is a function of the optimizer step alone, so a
    # resume fast-forwards it to the restored step instead of trusting a saved scheduler (older
    # DeepSpeed checkpoints have none; older multi-process ones saved a wrongly advanced one).
    if tracker is not None:
        acc.init_trackers("synthtune", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                               for k, v in to_dict(cfg).items()})

    state = ckpt.TrainState(processes=acc.num_processes)
    if cfg.resume_from:
        resume_dir = ckpt.find_resume_dir(out_dir, cfg.resume_from)
        saved = ckpt.TrainState.load(resume_dir)
        if saved.processes and saved.processes != acc.num_processes:
            # the data position is counted per process: another world size would replay or skip data
            raise ConfigError(f"resume_from: {resume_dir} was written by {saved.processes} process(es), this "
                              f"launch has {acc.num_processes}; resume with the same launcher config")
        acc.load_state(str(resume_dir), **load_kw)
        state = saved
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(state.global_step):
                sched.step()
        say(f"resumed from {resume_dir} at step {state.global_step} (epoch {state.epoch}, "
            f"batch {state.batch_in_epoch})")

    world = acc.num_processes
    sums = HostSums(world, acc.device, cfg.host_collectives)
    history = state.history  # a resumed run continues the stopped run's records
    bar = tqdm(total=total_steps, initial=state.global_step, desc="training", unit="step",
               disable=not (progress and main), dynamic_ncols=True)
    t_train = time.perf_counter()
    tokens_seen_run = tokens_at_log = 0
    t_log = t_train
    # This rank's summed loss since the last flush, left on the device: reading it is a sync, so
    # it is read (and reduced over ranks) once per logging interval, and before a checkpoint
    # (the state carries the logging interval's sums, so a stop mid-interval resumes them).
    log_loss = torch.zeros((), device=acc.device)
    saved_step = -1

    def flush_loss() -> None:
        state.log_loss_sum += float(acc.reduce(log_loss.clone(), reduction="sum"))
        log_loss.zero_()

    def save() -> None:
        nonlocal saved_step
        flush_loss()
        ckpt.save_checkpoint(acc, out_dir, state, cfg.save_total_limit, **save_kw)
        saved_step = state.global_step

    def stop(by_signal: bool) -> dict:
        if saved_step != state.global_step:  # a checkpoint of this very step is already on disk otherwise
            save()
        bar.close()
        why = f"on {stops.name}" if by_signal else "(stop_at_step)"
        say(f"stopped at step {state.global_step} {why}, checkpoint written; resume with resume_from=latest")
        if tracer is not None:
            tracer.stop()
        acc.end_training()
        return {"stopped_at_step": state.global_step, "output_dir": str(out_dir),
                "stopped_by": stops.name if by_signal else "stop_at_step"}

    model.train()
    stops = StopRequests()
    with stops:
        while state.global_step < total_steps:
            if state.batch_in_epoch >= G * windows_per_epoch:
                # a checkpoint from an epoch's last window (a stop there saves before the epoch ends):
                # what the sharded loader still holds is the padding the uninterrupted run never trains on
                state.epoch += 1
                state.batch_in_epoch = 0
            train_dl.set_epoch(state.epoch)
            batches = acc.skip_first_batches(train_dl, state.batch_in_epoch) if state.batch_in_epoch else train_dl
            window: list[dict] = []
            for batch in batches:
                window.append(batch)
                if len(window) < G:
                    continue
                # The step's one collective, on host numbers (the collator counted the labels): the
                # window's label tokens on all ranks, needed before its backward, and whether any
                # rank was asked to stop. A stop asked during the previous step is acted on here, with
                # every rank at the same step: nothing of this window has run, so the checkpoint is
                # the previous step's, and a resume fetches this window again.
                n_label, asked = sums.reduce([sum(label_tokens(b, seq2seq) for b in window), stops.asked])
                if asked:
                    stops.agree(sums)
                    return stop(by_signal=True)
                for mb in window:
                    with acc.accumulate(model):
                        loss_sum = step_loss_sum(model, mb, seq2seq, cfg.loss_impl)
                        # accelerate divides by G; DDP averages over ranks: both undone here, so the
                        # step's gradient is the global token mean over the whole window.
                        acc.backward(loss_sum * G * world / max(n_label, 1))
                        log_loss += loss_sum.detach().float()
                        if acc.sync_gradients and cfg.max_grad_norm > 0:
                            acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        opt.step()
                        if acc.sync_gradients:
                            sched.step()
                        opt.zero_grad(set_to_none=True)
                    tokens_seen_run += batch_tokens(mb, seq2seq)
                state.batch_in_epoch += G
                state.global_step += 1
                window = []
                state.log_label_tokens += n_label
                bar.update(1)
                if state.global_step % cfg.logging_steps == 0 or state.global_step == total_steps:
                    flush_loss()  # the logging interval's one device->host wait
                    # the rate since the last log, so warm-up steps don't hide the steady state
                    now = time.perf_counter()
                    rate = (tokens_seen_run - tokens_at_log) * world / max(now - t_log, 1e-9)
                    tokens_at_log, t_log = tokens_seen_run, now
                    rec = {"step": state.global_step, "loss": state.log_loss_sum / max(state.log_label_tokens, 1),
                           "lr": sched.get_last_lr()[0], "tokens_per_s": rate}
                    history.append(rec)
                    acc.log({"train/loss": rec["loss"], "train/lr": rec["lr"], "train/tokens_per_s": rec["tokens_per_s"]},
                            step=state.global_step)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    state.log_loss_sum, state.log_label_tokens = 0.0, 0
                stop_requested = False
                if cfg.eval_steps and state.global_step % cfg.eval_steps == 0 and state.global_step < total_steps:
                    # a launcher kills ~30 s after its signal: save first, evaluate never
                    stop_requested = stops.any_rank(sums)
                    if not stop_requested:
                        metrics = evaluate(acc, model, tok, eval_dl, data.eval_questions, cfg, seq2seq)
                        history.append({"step": state.global_step, **metrics})
                        say(f"step {state.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                                      if isinstance(v, float)))
                        acc.log(metrics, step=state.global_step)
                        model.train()
                        # a signal that came during the evaluation (minutes of generation) stops here
                        stop_requested = stops.any_rank(sums)
                if cfg.save_steps and state.global_step % cfg.save_steps == 0:
                    save()
                if state.global_step >= total_steps:
                    break
                if stop_requested or (cfg.stop_at_step is not None and state.global_step >= cfg.stop_at_step):
                    return stop(by_signal=stop_requested)
                if state.batch_in_epoch >= G * windows_per_epoch:
                    break  # what is left of the epoch is padding or cannot fill a window on every rank
            if state.global_step < total_steps:  # the epoch ran out: next epoch from its first batch
                state.epoch += 1
                state.batch_in_epoch = 0
    bar.close()
    train_s = time.perf_counter() - t_train
    model_states = states_probe.result(acc, model)  # at rest: before evaluation gathers anything
    # every rank's own count: ranks get batches of other lengths, so rank 0's count x world is off
    (tokens_run,) = sums.reduce([tokens_seen_run])
    if cfg.save_steps and state.global_step % cfg.save_steps:  # the last step's, unless the loop saved it
        # before the final evaluation's record: a run resumed from here to train longer adds its own
        save()
    final_metrics = evaluate(acc, model, tok, eval_dl, data.eval_questions, cfg, seq2seq)
    history.append({"step": state.global_step, **final_metrics})
    acc.log(final_metrics, step=state.global_step)
    final_dir = ckpt.save_final(acc, model, tok, out_dir / "final", is_peft=cfg.method in ("lora", "qlora"),
                                base=describe_base(cfg.model, model_path, seed=cfg.seed, random_init=cfg.random_init))
    mem = tracer.stop() if tracer is not None else {}
    if torch.cuda.is_available() and not use_cpu:
        mem["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    mem["estimate"] = predicted_memory(cfg, prec, acc, data.stats, attn)
    mem["model_states_bytes"] = model_states
    train_losses = [h["loss"] for h in history if "loss" in h]
    summary = {
        "model": cfg.model, "model_path": model_path, "method": cfg.method, "kind": "seq2seq" if seq2seq else "causal",
        "steps": state.global_step, "epochs_completed": state.epoch, "processes": world,
        # what actually ran: accelerate can quietly fall back from the launcher config (e.g. to DDP)
        "distributed_type": acc.distributed_type.value,
        "zero_stage": getattr(plugin, "zero_stage", None) if plugin is not None else None,
        "zero3_partitions": partitions, "attn_implementation": attn,
        "trainable_params": n_train, "total_params": n_total,
        "train_tokens_run": tokens_run, "train_seconds": round(train_s, 3),  # ms: loop_bench differences two runs
        "tokens_per_s": round(tokens_run / max(train_s, 1e-9), 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        **{f"final_{k.replace('/', '_')}": v for k, v in final_metrics.items()},
        "memory": mem, "final_dir": str(final_dir), "history": history, "data": data.stats,
    }
    if main:
        curve = plot_history(history, out_dir / "loss.png")
        summary["loss_png"] = str(curve) if curve else None
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    acc.wait_for_everyone()
    acc.end_training()  # closes trackers and, under launch, the process group: keep it last
    return summary
