"""Generation backends behind ``synthtune synth --backend``.

A backend turns prompts into k samples each. The interface is deliberately one method, so the
server-backed ``openai`` backend (vLLM, TGI, llama.cpp, ``synthtune serve``; see
``synthtune.synth.openai_backend``) fits behind the same flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from synthtune.generation.base import SamplingParams
from synthtune.generation.sampler import Sample, sample_k
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
    """Local transformers model; causal models share each prompt's prefill among its k samples."""

    name = "hf"
    chat_on_server = False

    def __init__(self, lm, batch_size: int = 1):
        self.lm = lm
        self.model_name = lm.name
        self.batch_size = batch_size

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
                        add_special_tokens=prompts[0].add_special_tokens, batch_size=self.batch_size)


def make_backend(name: str, model: str, *, device: str | None = None, seed: int = 0,
                 trust_remote_code: bool = False, batch_size: int = 1) -> HFBackend:
    from synthtune.errors import ConfigError
    from synthtune.models import load_model

    if name != "hf":
        raise ConfigError(f"unknown backend {name!r} for a local model; available: hf (and openai, which "
                          f"needs endpoints: see backend_for)")
    lm = load_model(model, device=device, seed=seed, trust_remote_code=trust_remote_code)
    return HFBackend(lm, batch_size=batch_size)


def check_calculator_backend(cfg) -> None:
    """Refuse ``calculator: true`` with a backend that cannot run GSM8K's calculator while sampling.

    The one place that decides it: synthesis calls this before it reads or writes anything. Only
    ``hf`` forces calculator results today (``synthtune.generation.calc_decoding``); a server
    backend would need the server to do it, or the client to resume each sample after an injection.
    """
    from synthtune.errors import ConfigError

    if cfg.calculator and cfg.backend != "hf":
        raise ConfigError(f"calculator: true needs backend: hf (backend is {cfg.backend!r}): the {cfg.backend} "
                          f"backend cannot force calculator results into the servers' samples yet. Use "
                          f"backend: hf, or set calculator: false")


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
                        trust_remote_code=cfg.trust_remote_code)
