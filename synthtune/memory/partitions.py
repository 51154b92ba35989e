"""What one rank really holds of the model states: weights, gradients and optimizer states, in bytes.

The estimator's ``model_states_bytes`` is arithmetic; this counts the tensors a training run
actually keeps, so the two can sit side by side in ``summary.json`` (``memory.model_states_bytes``)
and be compared in the tests. Under DeepSpeed that means its partitions, not the module's
parameters: ZeRO-3 leaves each parameter an empty placeholder and keeps this rank's slice in
``param.ds_tensor``; ZeRO-1/2 optimizers step fp32 *master* partitions of their own.

Gradients and optimizer states are read at the optimizer step, the one moment they all exist:
ZeRO-2 builds its gradient partition for the step and frees it afterwards, and ZeRO-3 hands its
sub-groups to the inner optimizer one at a time. A post-step hook on the innermost torch
optimizer sees each (sub-)group with its gradients still attached and its states created.
"""

from __future__ import annotations


def innermost_optimizer(opt):
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (each keeps it as ``.optimizer``)."""
    while hasattr(opt, "optimizer") and opt.optimizer is not opt:
        opt = opt.optimizer
    return opt


def _local(t):
    """The tensor this rank holds: an FSDP2 DTensor reports the global numel and a data_ptr of 0,
    its ``to_local()`` is the shard in this rank's memory."""
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class ModelStateProbe:
    """Counts, per rank, the bytes of weights, gradients and optimizer states a run holds.

    Create it after ``accelerator.prepare``; call :meth:`result` (a collective) after training.
    Tensors are keyed by storage address, so a tensor seen by two names
    counts once, and a master partition that *is* the model's weight is not counted twice.
    """

    def __init__(self, optimizer):
        self.inner = innermost_optimizer(optimizer)
        # keyed by the stepped tensor's address (stable across steps; ZeRO-2 allocates a fresh
        # gradient partition at every step, so its gradients' own addresses are not)
        self.grads: dict[int, int] = {}
        self.states: dict[tuple[int, str], int] = {}
        self.steppers: dict[int, int] = {}  # the tensors the inner optimizer updates
        self._handle = self.inner.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        # Sizes do not change after the first step (Adam's states exist from then on), so one
        # look is enough: the hook leaves the training loop's hot path once it has looked.
        self._handle.remove()
        for group in optimizer.param_groups:
            for p in group["params"]:
                ptr = _local(p).data_ptr()
                self.steppers[ptr] = _nbytes(_local(p))
                if p.grad is not None:
                    self.grads[ptr] = _nbytes(_local(p.grad))
                for name, value in optimizer.state.get(p, {}).items():
                    # Adam's `step` counter is a 0-d tensor: bookkeeping, not a state per parameter
                    if hasattr(value, "data_ptr") and value.dim() > 0:
                        self.states[ptr, name] = _nbytes(_local(value))

    @staticmethod
    def weights(model) -> tuple[int, int, set[int]]:
        """This rank's weights in bytes (under ZeRO-3 its partitions), the bytes of ZeRO-3 parameters
        gathered whole right now, and the addresses the weights live at.

        Under ZeRO-3 a parameter of at most ``stage3_param_persistence_threshold`` elements (``ds_persist``)
        stays whole on every rank besides its partition: weights too. Any other parameter
        gathered at the time is ZeRO-3's reuse cache (``stage3_max_reuse_distance``), which the
        estimator counts apart (its ``gathered`` layers)."""
        weights, gathered, at = 0, 0, set()
        for p in model.parameters():
            part = getattr(p, "ds_tensor", None)
            if part is not None:
                if part.data_ptr() not in at:
                    at.add(part.data_ptr())
                    weights += _nbytes(part)
                if getattr(p, "ds_persist", False):  # small: kept whole on every rank, for good
                    weights += _nbytes(p.data)
                else:
                    gathered += _nbytes(p.data)
            elif (mine := _local(p.data)).numel() and mine.data_ptr() not in at:
                at.add(mine.data_ptr())
                weights += _nbytes(mine)
        return weights, gathered, at

    def local(self, model) -> dict[str, int]:
        self._handle.remove()
        weights, gathered, at = self.weights(model)
        # DeepSpeed's fp32 master partitions are clones, not the weights: optimizer memory
        master = sum(n for ptr, n in self.steppers.items() if ptr not in at)
        return {"weights": weights, "gradients": sum(self.grads.values()),
                "optimizer": sum(self.states.values()) + master, "gathered": gathered}

    def result(self, acc, model) -> list[dict[str, int]]:
        """Every rank's counts, in rank order (a collective: all ranks must call it)."""
        from accelerate.utils import gather_object

        return gather_object([{"rank": acc.process_index, **self.local(model)}])
