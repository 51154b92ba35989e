"""Generation backends behind ``synthtune synth --backend``.

A backend turns prompts into k samples each. The interface is deliberately one method, so a
server-backed backend (OpenAI-compatible: vLLM, TGI, llama.cpp) fits behind the same flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from synthtune.generation import SamplingParams
from synthtune.synth.prompts import Prompt
from synthtune.synth.sampler import Sample, sample_k

BACKENDS = ("hf",)


class Backend(Protocol):
    name: str
    model_name: str

    def sample(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Sample]]:
        """``params.num_samples`` samples for each prompt, in prompt order."""
        ...


class HFBackend:
    """Local transformers model; causal models share each prompt's prefill among its k samples."""

    name = "hf"

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
    from synthtune.config import ConfigError
    from synthtune.models import load_model

    if name != "hf":
        raise ConfigError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    lm = load_model(model, device=device, seed=seed, trust_remote_code=trust_remote_code)
    return HFBackend(lm, batch_size=batch_size)
