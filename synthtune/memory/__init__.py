"""Memory: estimate before training (analytical, LoRA-aware), trace while training (measured).

>>> from synthtune.memory import Setup, estimate, load_shape
>>> shape = load_shape("tiny-llama")  # the config only: no weights are loaded
>>> full = estimate(shape, Setup(method="full", batch_size=8, seq_len=256))
>>> round(full.bytes_per_param)  # fp32 weights + bf16 copy + fp32 grads + two Adam moments
18
>>> lora = estimate(shape, Setup(method="lora", batch_size=8, seq_len=256))
>>> lora.bytes_per_param < full.bytes_per_param / 2, lora.peak_phase
(True, 'backward_start')

While training, :class:`MemoryTracer` samples memory on a thread and writes a CSV and a PNG::

    with MemoryTracer("outputs/run", interval_s=0.5) as tr:
        ...
    tr.summary()
"""

from synthtune.memory.estimate import Estimate, Setup, estimate, rule_of_thumb_bytes, workshop_rule  # noqa: F401 (workshop_rule: deprecated alias)
from synthtune.memory.shape import FLAN_UL2_CONFIG, ModelShape, load_shape, shape_from_config
from synthtune.memory.trace import MemoryTracer

__all__ = ["Estimate", "FLAN_UL2_CONFIG", "MemoryTracer", "ModelShape", "Setup", "estimate", "load_shape",
           "rule_of_thumb_bytes", "shape_from_config"]
