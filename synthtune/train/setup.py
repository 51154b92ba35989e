"""Everything a training run needs before its first step, each piece small and testable.

``validate`` runs before any weights load, so a typo in a recipe costs seconds, not a model
download: unknown LoRA targets, a max_length over the model's limit, missing data, qlora
without CUDA all fail here with the key and the reason.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from synthtune import paths
from synthtune.config import TrainConfig
from synthtune.data.gsm8k import load_source
from synthtune.errors import ConfigError, DataError, ModelError
from synthtune.models import is_seq2seq_config, load_config, meta_model
from synthtune.train.loss import chunked_loss_problem


@dataclass
class Precision:
    weights_dtype: str  # "fp32" | "bf16"
    mixed_precision: str  # accelerate's: "no" | "bf16"


def resolve_precision(cfg: TrainConfig, cuda: bool, bf16_ok: bool) -> Precision:
    choice = cfg.precision
    if choice == "auto":
        if not (cuda and bf16_ok):
            return Precision("fp32", "no")
        # LoRA: bf16 frozen base weights halve memory at no accuracy cost (the adapters stay fp32
        # in peft). Full fine-tuning: fp32 master weights, since bf16 updates lose small steps.
        choice = "bf16" if cfg.method in ("lora", "qlora") else "bf16-mixed"
    if choice in ("bf16", "bf16-mixed") and not (cuda and bf16_ok):
        if choice == "bf16":
            return Precision("bf16", "no")  # CPUs can run bf16 weights; autocast on CPU buys nothing here
        raise ConfigError(f"precision={choice}: bf16 autocast needs a CUDA GPU with bf16 support; use fp32")
    return {"fp32": Precision("fp32", "no"), "bf16": Precision("bf16", "bf16"),
            "bf16-mixed": Precision("fp32", "bf16")}[choice]


# Which way of keeping packed examples apart each attention kernel honours (transformers 5.x):
# - mask: our (B, 1, S, S) additive mask, used as given by sdpa and eager. flex would read it
#   only as a dense score bias over every block (none skipped), and flash-attn takes no dense
#   mask, so neither is offered it.
# - position_ids: no mask; transformers finds the documents from the position resets and builds a
#   dense per-document mask (sdpa, eager) or a BlockMask that skips other documents' blocks (flex).
#   flash-attn reads resets only from a single flattened row (batch size 1) and otherwise attends
#   across documents without a word, so it is refused there.
# - varlen: the batch flattened into one row with precomputed cu_seqlens: flash-attn's varlen
#   kernel and no padding at all. The other kernels ignore cu_seqlens and would build an
#   (N x N) mask over the whole flattened batch, so it is theirs to refuse.
PACKING_MODES = {"sdpa": ("mask", "position_ids"), "eager": ("mask", "position_ids"),
                 "flex_attention": ("position_ids",), "flash_attention_2": ("varlen",)}
# auto: the mode with the least work per kernel. sdpa/eager: the same kernel runs either way (a
# mask with arbitrary blocks keeps sdpa off the flash kernel whoever builds it), and the 4D mask
# spares transformers' per-forward host check of the position resets. flex: its block mask skips
# the other documents' blocks. flash: varlen computes no padding and no cross-document pairs.
AUTO_PACKING = {"sdpa": "mask", "eager": "mask", "flex_attention": "position_ids", "flash_attention_2": "varlen"}
FLASH_ATTN_INSTALL = "pip install flash-attn --no-build-isolation (a CUDA build matching your torch)"


def flash_attn_problem() -> str | None:
    """Why flash-attn cannot be used here, or None. Imported for real: an install built against
    another torch fails only at import (undefined symbol), which a package lookup would miss."""
    try:
        import flash_attn  # noqa: F401
    except Exception as err:  # ImportError, or OSError/RuntimeError from a mismatched binary
        return f"flash-attn does not import ({type(err).__name__}: {err})"
    return None


SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn",
                 "flash_attention_2": "_supports_flash_attn"}  # eager: every model


def model_class(mcfg, seq2seq: bool):
    """The transformers class a config loads as, or None (remote code, an unknown architecture)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    )

    try:
        return (MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if seq2seq else MODEL_FOR_CAUSAL_LM_MAPPING)[type(mcfg)]
    except KeyError:
        return None


def resolve_attention(cfg: TrainConfig, cuda: bool, bf16_ok: bool, cls=None, seq2seq: bool = False) -> str | None:
    """The ``attn_implementation`` to load the model with; None leaves transformers' default (sdpa
    where the model has it, else eager), which is what ``auto`` means.

    ``cls`` is the model's class (:func:`model_class`), for the models that lack a kernel. Raises
    ConfigError, naming the key, for a kernel this machine or model cannot train with.
    """
    choice = cfg.attn_implementation
    half = resolve_precision(cfg, cuda, bf16_ok) != Precision("fp32", "no")  # flash-attn computes in bf16/fp16 only
    if choice == "auto":
        # transformers' default. flash-attn stays opt-in until its packed (varlen) layout has been
        # checked against unpacked losses on a GPU: CPUs cannot run it, and no GPU run has yet
        return None
    flag = SUPPORT_FLAGS.get(choice)
    if cls is not None and flag and not getattr(cls, flag, False):
        raise ConfigError(f"attn_implementation={choice}: {cls.__name__} ({cfg.model}) has no {choice} kernel in "
                          f"transformers; use auto or eager")
    if choice == "flash_attention_2":
        problem = flash_attn_problem()
        if problem:
            raise ConfigError(f"attn_implementation=flash_attention_2: {problem}; install it with "
                              f"{FLASH_ATTN_INSTALL}, or use attn_implementation=sdpa")
        if not cuda:
            raise ConfigError("attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
        if not half:
            raise ConfigError(f"attn_implementation=flash_attention_2 computes in bf16/fp16, but precision="
                              f"{cfg.precision} runs fp32 here; set precision=bf16 or bf16-mixed (a GPU with bf16), "
                              f"or use attn_implementation=sdpa")
    if choice == "flex_attention":
        import torch
        from transformers.utils import is_torch_flex_attn_available

        if not is_torch_flex_attn_available():
            raise ConfigError(f"attn_implementation=flex_attention: torch {torch.__version__} has no flex attention; "
                              f"use sdpa")
        if not cuda:
            # torch's FlexAttention raises "does not support backward on CPU" at the first step
            raise ConfigError(f"attn_implementation=flex_attention trains on CUDA only (torch {torch.__version__} "
                              f"has no flex attention backward on CPU); use sdpa on CPU")
    return choice


def resolve_packing_mode(cfg: TrainConfig, attn_implementation: str | None) -> str | None:
    """How :class:`PackedCollator` keeps packed examples apart for this kernel (None without
    packing); ConfigError for a mode the kernel would ignore or cannot take."""
    if not cfg.packing:
        return None
    attn = attn_implementation or "sdpa"  # None: transformers' default; sdpa and eager take the same modes
    if attn not in PACKING_MODES:
        raise ConfigError(f"packing: no packing mode is known to keep examples apart under attn_implementation="
                          f"{attn}; use sdpa, eager, flex_attention or flash_attention_2, or packing=false")
    if cfg.packing_mode == "auto":
        return AUTO_PACKING[attn]
    if cfg.packing_mode not in PACKING_MODES[attn]:
        raise ConfigError(f"packing_mode={cfg.packing_mode} is not a layout attn_implementation={attn} takes "
                          f"(it takes {' or '.join(PACKING_MODES[attn])}: another would attend across examples "
                          f"or build a mask over the whole batch); use packing_mode=auto")
    return cfg.packing_mode


def on_cuda(cfg: TrainConfig) -> tuple[bool, bool]:
    """(CUDA, bf16 on it) as train() decides them."""
    import torch

    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    return cuda, cuda and torch.cuda.is_bf16_supported()


def default_output_dir(cfg: TrainConfig) -> Path:
    return paths.OUTPUTS_DIR / "train" / f"{Path(cfg.model).name}-{cfg.method}"


def lora_target_modules(cfg: TrainConfig):
    return "all-linear" if cfg.lora_targets in (["all-linear"], ["all_linear"]) else list(cfg.lora_targets)


def _matching_modules(model, targets) -> list[str]:
    names = [n for n, _ in model.named_modules()]
    if targets == "all-linear":
        return names
    return [n for n in names if any(n == t or n.endswith("." + t) or re.fullmatch(t, n) for t in targets)]


def validate(cfg: TrainConfig) -> None:
    """Fail fast, naming the key and the reason, before any weights are loaded."""
    import torch

    if cfg.per_device_batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise ConfigError("per_device_batch_size and gradient_accumulation_steps must be >= 1")
    if cfg.pad_to_multiple_of is not None and cfg.pad_to_multiple_of < 1:
        raise ConfigError(f"pad_to_multiple_of: {cfg.pad_to_multiple_of} is not a positive number of tokens "
                          f"(e.g. 64 on GPUs), or null to pad to the longest row")
    if cfg.max_steps == 0 or (cfg.max_steps < 0 and cfg.num_epochs <= 0):
        raise ConfigError("max_steps: set a positive max_steps, or max_steps=-1 with num_epochs > 0")
    if cfg.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("method=qlora needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; "
                              "use method=lora otherwise") from None
        if not torch.cuda.is_available():
            raise ConfigError("method=qlora needs a CUDA GPU (4-bit kernels); use method=lora on CPU")
    for key in ("data", "eval_data"):
        spec = getattr(cfg, key)
        if spec is None:
            continue
        try:
            load_source(spec, cfg.gsm8k_dir, limit=1)
        except DataError as err:
            raise ConfigError(f"{key}: {err}") from None
    if cfg.random_init and cfg.method == "qlora":
        raise ConfigError("random_init with method=qlora: 4-bit quantization needs real weights to quantize")
    if cfg.resume_from not in (None, "latest") and not Path(cfg.resume_from).is_dir():
        raise ConfigError(f"resume_from: {cfg.resume_from} is not a checkpoint directory (or use 'latest')")
    try:
        mcfg = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except ModelError as err:
        raise ConfigError(f"model: {err}") from None
    limit = getattr(mcfg, "max_position_embeddings", None) or getattr(mcfg, "n_positions", None)
    if limit and not is_seq2seq_config(mcfg) and cfg.max_length > limit:
        raise ConfigError(f"max_length={cfg.max_length} is over {cfg.model}'s limit of {limit} positions")
    if cfg.loss_impl == "chunked":
        why = chunked_loss_problem(mcfg) or ("the compiled graph would not run the lm_head capture (compile: true)"
                                            if cfg.compile else None)
        if why:
            raise ConfigError(f"loss_impl: chunked computes the loss from the lm_head's input, but {why}; use "
                              f"loss_impl: standard")
    if cfg.packing and is_seq2seq_config(mcfg):
        raise ConfigError("packing=true is for causal models; seq2seq batches are already dynamic")
    seq2seq = is_seq2seq_config(mcfg)
    resolve_packing_mode(cfg, resolve_attention(cfg, *on_cuda(cfg), model_class(mcfg, seq2seq), seq2seq))
    if cfg.method in ("lora", "qlora"):
        targets = lora_target_modules(cfg)
        if targets != "all-linear":
            meta = meta_model(mcfg, trust_remote_code=cfg.trust_remote_code)
            unmatched = [t for t in targets if not _matching_modules(meta, [t])]
            if unmatched:
                leaves = sorted({n.rsplit(".", 1)[-1] for n, m in meta.named_modules()
                                 if isinstance(m, torch.nn.Linear)})
                raise ConfigError(f"lora_targets: {unmatched} match no module of {cfg.model}; its linear "
                                  f"layers are named {', '.join(leaves)} (or use all-linear)")


def validation_problem(cfg: TrainConfig) -> ConfigError | None:
    """:func:`validate`, with the error returned instead of raised when this is one of several
    launched processes: it is raised on every rank by :func:`raise_if_any_rank_failed` once the
    process group is up.

    A rank that gave up alone would leave the others waiting for it in their first collective
    until the process group's timeout (30 min): on several machines nothing else notices (each
    torchrun agent watches only its own workers). A data file present on one node only does that.
    """
    try:
        validate(cfg)
    except ConfigError as err:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return err
        raise
    return None


def raise_if_any_rank_failed(acc, problem: Exception | None) -> None:
    """Every rank raises the same error when any rank's configuration or data failed (a collective).

    A rank's own error is chained, so its traceback still shows where it came from."""
    if acc.num_processes == 1:  # nobody to tell: the error as it was raised
        if problem is not None:
            raise problem
        return
    from accelerate.utils import gather_object

    def describe(err: Exception) -> str:
        return str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"

    failed = [(rank, msg) for rank, msg in enumerate(gather_object([None if problem is None else describe(problem)]))
              if msg is not None]
    if failed:
        raise ConfigError("; ".join(f"rank {rank} of {acc.num_processes}: {msg}" for rank, msg in failed)
                          + " (every rank stops)") from problem


def apply_lora(model, cfg: TrainConfig, is_seq2seq: bool):
    from peft import LoraConfig, TaskType, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_target_modules(cfg),
                      task_type=TaskType.SEQ_2_SEQ_LM if is_seq2seq else TaskType.CAUSAL_LM)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` attribute: a warning on
        # every run that the user can do nothing about
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lcfg)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_tracker(log_with: str) -> str | None:
    """The accelerate tracker to start for ``log_with``, or None for none.

    TensorBoard is an extra (``synthtune[tracking]``), so ``auto`` takes it only when it is
    installed; naming a tracker that is not installed stops before any work, where accelerate
    would warn and log nowhere.
    """
    if log_with == "none":
        return None
    module = "wandb" if log_with == "wandb" else "tensorboard"
    if _installed(module):
        return log_with if log_with != "auto" else "tensorboard"
    if log_with == "auto":
        return None
    fix = "pip install 'synthtune[tracking]'" if module == "tensorboard" else "pip install wandb"
    raise ConfigError(f"log_with: {log_with} needs the {module} package, which is not installed: {fix}, or set "
                      f"log_with=auto or none (train_log.jsonl holds the metrics either way)")


def require_deepspeed() -> None:
    """Stop with what to install when the launch asks for DeepSpeed and it is absent.

    DeepSpeed is the ``zero`` extra: plain, DDP and FSDP runs need none of it. ``accelerate
    launch`` checks for it itself; this covers a launch that sets ACCELERATE_USE_DEEPSPEED itself.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not _installed("deepspeed"):
        raise ConfigError("the launch turns DeepSpeed on (ACCELERATE_USE_DEEPSPEED=true) but DeepSpeed is not "
                          "installed: pip install 'synthtune[zero]' (Linux only), or launch with an accelerate "
                          "config without deepspeed_config (single-process, DDP and FSDP need no DeepSpeed)")


def deepspeed_cpu_process_group():
    """accelerate's process-group settings for DeepSpeed on a machine without CUDA, or None.

    Under ``accelerate launch`` with DeepSpeed, accelerate picks the communication backend from
    the devices it finds (nccl for CUDA, hccl, xccl...), finds none on a CPU-only machine and
    leaves the backend unset. DeepSpeed then initializes the process group itself, with its CPU
    accelerator's backend (oneCCL when installed, else gloo), so the ranks *are* connected; but
    accelerate, holding no backend, counts 1 process, rank 0, on every rank. It then writes
    ``train_batch_size = micro_batch * accumulation * 1`` into the DeepSpeed config, which
    DeepSpeed rejects against its real world size ("8 != 4 * 2 * 2"), and would shard no data.
    Naming the backend DeepSpeed will use makes accelerate read the world size and rank from the
    process group. On GPUs accelerate finds nccl by itself: this returns None and changes nothing.
    ``Accelerator(cpu=True)`` is no way out: it drops the DeepSpeed launcher config altogether.
    """
    import torch

    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available()
            or int(os.environ.get("LOCAL_RANK", -1)) == -1):  # -1: not launched, accelerate sets up no group
        return None
    from accelerate.utils import InitProcessGroupKwargs
    from deepspeed.accelerator import get_accelerator

    _skip_deepspeed_shm_build()
    return InitProcessGroupKwargs(backend=get_accelerator().communication_backend_name())


def _skip_deepspeed_shm_build() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce op at its first init.

    Its CPU comm backend JIT-builds ``deepspeed_shm_comm`` (C++, with g++ and ninja) in each new
    environment, ~45 s of CPU with every rank of the launch waiting, for ``inference_all_reduce``
    alone; training's collectives (ZeRO's gathers and reductions) go through torch.distributed.
    Marked incompatible in DeepSpeed's table of ops, it is not built and nothing else changes.
    """
    import deepspeed.ops

    table = getattr(deepspeed.ops, "__compatible_ops__", None)  # probed lazily, on first access
    if isinstance(table, dict):  # a DeepSpeed without the table builds the op as before
        table["deepspeed_shm_comm"] = False


def trainable_parameters(model) -> tuple[int, int]:
    # ZeRO-3 partitions leave empty local tensors; ds_numel is the full size.
    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total


def zero3_partitions(acc, model) -> list[dict] | None:
    """What each rank holds of the ZeRO-3-partitioned parameters, one record per rank (None
    unless ZeRO-3 partitioned the model). A collective: every rank must call it.

    ``p.ds_tensor`` is a rank's own slice of ``p`` (``p.ds_numel`` elements in all; DeepSpeed pads
    the last slice, so each share is at least 1/world). A share near 1 means that parameter is
    held whole on every rank: a model that escaped partitioning, for which ZeRO-3 saves nothing.
    ``persistent_numel`` counts the elements DeepSpeed keeps gathered on every rank besides their
    slice: parameters of at most ``stage3_param_persistence_threshold`` elements (DeepSpeed's
    default 1e5; 10 x hidden size where a DeepSpeed config file says "auto"), meant to be biases
    and norms. A large count is memory ZeRO-3 does not save: all of a tiny model's parameters.
    """
    from accelerate.utils import gather_object

    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None or getattr(plugin, "zero_stage", 0) != 3:  # the same answer on every rank
        return None
    params = [p for p in model.parameters() if getattr(p, "ds_tensor", None) is not None]
    if not params:
        raise RuntimeError("ZeRO-3 is on but no parameter was partitioned (no ds_tensor): the model was not "
                           "prepared by DeepSpeed")
    shares = [p.ds_tensor.numel() / p.ds_numel for p in params if p.ds_numel]
    mine = {"rank": acc.process_index, "params": len(params),
            "local_numel": sum(p.ds_tensor.numel() for p in params),
            "full_numel": sum(p.ds_numel for p in params),
            "persistent_numel": sum(p.ds_numel for p in params if getattr(p, "ds_persist", False)),
            "min_share": min(shares), "max_share": max(shares)}
    return sorted(gather_object([mine]), key=lambda r: r["rank"])
