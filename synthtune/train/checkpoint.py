"""Checkpoints (resume) and the final model or adapter (safetensors).

A checkpoint is accelerate's ``save_state`` (model, optimizer, RNG of every rank; DeepSpeed's
own sharded format under ZeRO) plus ``trainer_state.json`` with the step, data position and the
logged history. The LR schedule is not stored: the loop rebuilds it from the step.
LoRA checkpoints hold the adapter weights only (:func:`adapter_only_checkpoints`).
It is written to a temporary name and renamed when whole, so a crash mid-save never leaves a
checkpoint that ``resume_from=latest`` would pick up half-written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from synthtune.errors import ConfigError
from synthtune.files import replace_dir

STATE_FILE = "trainer_state.json"
CKPT_PREFIX = "step-"


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed (per process)
    processes: int = 0  # the world size that wrote it (0: unknown, an older checkpoint)
    # the logged records so far, so a resumed run's summary and loss.png cover the whole run
    history: list[dict] = field(default_factory=list)
    log_loss_sum: float = 0.0  # label-token loss summed since the last logged record (all ranks)
    log_label_tokens: int = 0

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        return cls(**json.loads((directory / STATE_FILE).read_text()))


def checkpoints(out_dir: Path) -> list[Path]:
    root = out_dir / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def find_resume_dir(out_dir: Path, resume_from: str) -> Path:
    if resume_from == "latest":
        found = checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"resume_from=latest: no checkpoint under {out_dir / 'checkpoints'} "
                                    f"(set save_steps to write some)")
        return found[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"resume_from={resume_from}: not a checkpoint (no {STATE_FILE})")
    return path


def adapter_only_checkpoints(acc, model) -> bool:
    """Make ``save_state``/``load_state`` keep only what trains (LoRA) plus buffers, not the frozen base.

    accelerate writes the whole state dict of every prepared model into each checkpoint: for LoRA on
    an 8B model that is 16 GB of frozen weights per checkpoint, rewritten at every ``save_steps``.
    The frozen base is the one the run started from, so a resume reloads it from the model anyway.
    On load, every key saved must exist in the model and every key missing must be a frozen
    parameter; anything else is an error, never a silently half-loaded model. DeepSpeed and FSDP
    keep their own checkpoint formats: no hooks there (see :func:`deepspeed_state_kwargs`).
    Returns whether the hooks were installed.
    """
    from accelerate.utils import DistributedType

    if acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return False
    # Names of the unwrapped model (accelerate saves DDP models without the "module." prefix);
    # remove_duplicate=False: a tied lm_head is its own key in the state dict.
    frozen = {n for n, p in acc.unwrap_model(model).named_parameters(remove_duplicate=False) if not p.requires_grad}

    base = acc.unwrap_model(model)
    fingerprint_file = "base_fingerprint.json"

    def drop_frozen(models, weights, output_dir) -> None:
        for sd in weights:
            for key in [k for k in sd if k.removeprefix("module.") in frozen]:
                del sd[key]
        if acc.is_main_process:
            (Path(output_dir) / fingerprint_file).write_text(json.dumps(base_fingerprint(base, frozen)) + "\n")

    def load_trainable(models, input_dir) -> None:
        from safetensors.torch import load_file

        for i, wrapped in enumerate(models):
            m = acc.unwrap_model(wrapped)
            path = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
            if not path.exists():
                raise ConfigError(f"resume_from: checkpoint {input_dir} has no {path.name}: it was not written by this "
                                        f"version's LoRA checkpointing; resume from a newer checkpoint or retrain")
            sd = {k.removeprefix("module."): v for k, v in load_file(str(path)).items()}
            current = {k: tuple(v.shape) for k, v in m.state_dict().items()}
            unexpected = sorted(k for k in sd if k not in current)
            reshaped = sorted(f"{k} {tuple(v.shape)} vs {current[k]}" for k, v in sd.items()
                              if k in current and tuple(v.shape) != current[k])
            not_frozen = sorted(k for k in current if k not in sd and k not in frozen)
            if unexpected or reshaped or not_frozen:
                raise ConfigError(f"resume_from: checkpoint {path} does not match this model (unexpected keys "
                                  f"{unexpected[:3]}, other shapes {reshaped[:3]}, trainable keys missing "
                                  f"{not_frozen[:3]}); resume with the same model, method and LoRA settings")
            m.load_state_dict(sd, strict=False)
        saved_fp = Path(input_dir) / fingerprint_file
        if saved_fp.exists() and json.loads(saved_fp.read_text()) != base_fingerprint(base, frozen):
            # the adapter alone would load onto any base of the same shape (base vs instruct, another
            # seed of a random model); it only means something on the base it was trained on
            raise ConfigError(f"resume_from: {input_dir} was trained on other base weights than this run's "
                              f"model; resume with the same model (and seed, for built-in or random-init models)")
        models.clear()  # loaded here; accelerate's strict load would reject the frozen keys' absence

    acc.register_save_state_pre_hook(drop_frozen)
    acc.register_load_state_pre_hook(load_trainable)
    return True


def deepspeed_state_kwargs(acc, adapter_only: bool) -> tuple[dict, dict]:
    """Extra ``save_state`` / ``load_state`` arguments under DeepSpeed.

    DeepSpeed writes its own checkpoints. Under ZeRO-3 they hold the frozen base too, as
    ``frozen_param_fragments``: the whole base, sharded over the ranks, in every checkpoint.
    For LoRA it is left out, and the load keeps the base the run started from.
    """
    from accelerate.utils import DistributedType

    if not adapter_only or acc.distributed_type != DistributedType.DEEPSPEED:
        return {}, {}
    return {"exclude_frozen_parameters": True}, {"load_module_strict": False}


def base_fingerprint(model, frozen: set[str]) -> dict:
    """A cheap identity of the frozen base: its key count and exact sums of a few of its tensors."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    names = sorted(n for n in frozen if n in params)
    picks = names[:2] + names[-2:] if len(names) > 4 else names
    with torch.no_grad():
        sums = {n: float(params[n].detach().double().sum()) for n in picks}
    return {"frozen": len(names), "sums": sums}


def save_checkpoint(acc, out_dir: Path, state: TrainState, keep: int, **save_kwargs) -> Path:
    root = out_dir / "checkpoints"
    final = root / f"{CKPT_PREFIX}{state.global_step:07d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{state.global_step:07d}"
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), **save_kwargs)
    acc.wait_for_everyone()
    if acc.is_main_process:
        state.save(tmp)
        # A checkpoint of the same step (a rerun) is swapped out whole, never deleted before the new
        # one is in place: a crash in between leaves a complete checkpoint, old or new.
        replace_dir(tmp, final)
        for old in checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def save_final(acc, model, tokenizer, directory: Path, *, is_peft: bool, base: dict | None = None) -> Path:
    """Save the adapter (LoRA) or the whole model as safetensors, with the tokenizer.

    ``accelerator.get_state_dict`` gathers ZeRO-3 partitions into a full state dict on rank 0.
    Calling ``save_pretrained`` on the wrapped module without it saves the local empty
    partitions: the 2023 code's empty adapter. The saved file is checked for that.
    ``base`` (:func:`synthtune.models.describe_base`) makes an adapter name a portable base
    and records the local one beside it. The tokenizer is saved as the base's
    (:func:`synthtune.models.save_tokenizer`).
    """
    from safetensors import safe_open

    from synthtune.models import save_tokenizer, write_adapter_metadata

    unwrapped = acc.unwrap_model(model)
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if is_peft and plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        # Gather only the adapter's partitions: get_state_dict would assemble the whole 16-bit
        # base model in host memory (38.7 GiB for Flan-UL2 in the H200 check) to save ~50 MB.
        import deepspeed
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        trainable = [p for p in unwrapped.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            adapter = {k: v.detach().cpu().clone().contiguous()
                       for k, v in get_peft_model_state_dict(unwrapped).items()}
        if acc.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            save_file(adapter, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
            unwrapped.peft_config["default"].save_pretrained(str(directory))
            save_tokenizer(tokenizer, directory)
    else:
        state_dict = acc.get_state_dict(model)
        if acc.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            unwrapped.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True)
            save_tokenizer(tokenizer, directory)
    if acc.is_main_process and is_peft and base is not None:
        write_adapter_metadata(directory, base)
    if acc.is_main_process:
        weights = directory / ("adapter_model.safetensors" if is_peft else "model.safetensors")
        files = [weights] if weights.exists() else sorted(directory.glob("*.safetensors"))
        numel = 0
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                numel += sum(_prod(sf.get_slice(k).get_shape()) for k in sf.keys())
        if numel == 0:
            raise RuntimeError(f"{directory}: the saved {'adapter' if is_peft else 'model'} is empty (0 parameters); "
                               f"under ZeRO-3 set zero3_save_16bit_model: true in the accelerate config")
    acc.wait_for_everyone()
    return directory


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def find_latest_run(*roots: Path) -> Path | None:
    """The most recently finished training run (one with a final adapter or model) under ``roots``.

    A run is a direct child of a root (``outputs/train/<run>``) or the ``train/`` folder of one
    (``outputs/demo/<timestamp>/train``, where `synthtune demo` trains).
    """
    runs = []
    for root in roots:
        if root.exists():
            for child in root.iterdir():
                runs += [p for p in (child, child / "train")
                         if (p / "final").is_dir() and (p / "summary.json").exists()]
    return max(runs, key=lambda p: (p / "summary.json").stat().st_mtime, default=None)
