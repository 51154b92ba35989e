"""Generation backends behind ``synthtune synth --backend``.

A backend turns prompts into k samples each. The interface is deliberately one method, so the
server-backed ``openai`` backend (vLLM, TGI, llama.cpp, ``synthtune serve``; see
``synthtune.synth.openai_backend``) fits behind the same flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from synthtune.generation.base import SamplingParams
from synthtune.generation.sampler import Sample, resolve_sampler, sample_k
from synthtune.synth.prompts import Prompt

BACKENDS = ("hf", "openai")


class Backend(Protocol):
    name: str
    model_name: str
    tokenizer: object | None  # the local tokenizer, for prompt rendering; None when a server renders
    is_seq2seq: bool
    # True when the server applies the chat template: chat prompts then carry messages, not text
    chat_on_server: bool

    def sample(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Sample]]:
        """``params.num_samples`` samples for each prompt, in prompt order."""
        ...


class HFBackend:
    """Local transformers model: on CPU a causal model's k samples share their prompt's prefill; on an
    accelerator, or with ``sampler="generate"``, HF's batched ``generate`` draws them (``pick_sampler``)."""

    name = "hf"
    chat_on_server = False

    def __init__(self, lm, batch_size: int = 1, sampler: str = "auto"):
        self.lm = lm
        self.model_name = lm.name
        self.batch_size = batch_size
        # the path sample_k takes, resolved for this model on its device (a bad choice fails here)
        self.sampler = resolve_sampler(lm, sampler)

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def is_seq2seq(self) -> bool:
        return self.lm.is_seq2seq

    def sample(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Sample]]:
        if not prompts:
            return []
        return sample_k(self.lm, [p.text for p in prompts], params,
                        add_special_tokens=prompts[0].add_special_tokens, batch_size=self.batch_size,
                        sampler=self.sampler)


def make_backend(name: str, model: str, *, device: str | None = None, seed: int = 0,
                 trust_remote_code: bool = False, batch_size: int = 1, sampler: str = "auto") -> HFBackend:
    from synthtune.errors import ConfigError
    from synthtune.models import load_model

    if name != "hf":
        raise ConfigError(f"unknown backend {name!r} for a local model; available: hf (and openai, which "
                          f"needs endpoints: see backend_for)")
    lm = load_model(model, device=device, seed=seed, trust_remote_code=trust_remote_code)
    return HFBackend(lm, batch_size=batch_size, sampler=sampler)


def check_calculator_backend(cfg) -> None:
    """Refuse ``calculator: true`` where the backend cannot run GSM8K's calculator while sampling.

    The one place that decides it: synthesis calls this before it reads or writes anything. ``hf``
    forces the results as tokens (``synthtune.generation.calc_decoding``); ``openai`` stops each
    sample at ``=`` and continues it after the result, which a completions prompt allows and a
    chat one does not (``openai_backend.check_calculator_format``).
    """
    if not cfg.calculator or cfg.backend != "openai":
        return
    from synthtune.formats import resolve_format
    from synthtune.synth.openai_backend import check_calculator_format

    # what prompt_setup resolves for a server-side backend: auto means chat there
    check_calculator_format(resolve_format(cfg.prompt_format, None, False, server_renders=True))


def backend_for(cfg):
    """The backend a ``SynthConfig`` asks for."""
    from synthtune.errors import ConfigError

    if cfg.backend == "openai":
        from synthtune.synth.openai_backend import OpenAIBackend

        return OpenAIBackend(cfg.endpoints, cfg.served_model or cfg.model, api_key_env=cfg.api_key_env,
                             concurrency=cfg.concurrency, request_timeout=cfg.request_timeout,
                             max_retries=cfg.max_retries, retry_backoff=cfg.retry_backoff)
    if cfg.endpoints:
        raise ConfigError(f"endpoints are only used by backend=openai (backend={cfg.backend}); add --backend openai "
                          f"to generate on those servers")
    return make_backend(cfg.backend, cfg.model, device=cfg.device, seed=cfg.seed,
                        trust_remote_code=cfg.trust_remote_code, sampler=cfg.sampler)
