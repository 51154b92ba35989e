"""Generation engines for local transformers models.

``base``: the contract every backend keeps (``SamplingParams``, ``Sample``, stop strings) and the plain
batched ``generate``. ``sampler``: ``sample_k``, which synthesis, eval and serve use for k samples
(the shared-prefill sampler on CPU, HF's batched ``generate`` on an accelerator; ``pick_sampler``),
and ``complete()``, which takes ``generate`` for one sample and ``sample_k`` for several. Nothing here
imports a job or synthesis.
"""
