"""Generation engines for local transformers models.

``base``: the contract every backend keeps (``SamplingParams``, ``Sample``, stop strings) and the plain
batched ``generate``. ``sampler``: the shared-prefill sampler that synthesis, eval and serve use, and
``complete()``, which picks it or falls back to ``generate``. Nothing here imports a job or synthesis.
"""
