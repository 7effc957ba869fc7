"""Algorithm 1's dropout on rows of frozen pre-trained weights: mask, run, restore exactly.

The mechanism is the literal one: the selected rows of W_up and W_gate are multiplied in place by
one shared element-wise keep-mask before a training step and written back from a saved copy
after it. In-place editing (rather than a hook on the layer output) is deliberate:

* everything that reads the weight sees the masked rows, including DoRA's weight-norm term and
  peft's DoRA path that recomputes the base output from the weight (a hook on the output of the
  base layer would miss both), and gradient-checkpoint recomputation in backward;
* the cost is two ``index_copy_`` of k x d numbers per micro-batch, nothing per layer or token.

Writes go through ``.data`` so autograd's version counter is not bumped: a forward pass may
have saved the (masked) weight for backward, and :meth:`RowDropout.unmasked` (used for DPO's
reference forward) temporarily restores and then re-applies the very same mask, so backward
sees exactly the values forward used.

What is put back is the rows as they were when THIS micro-batch's mask was applied, never an
older copy. For frozen pre-trained rows (the paper's case) that is the same copy every time. Rows
the optimizer trains (peft's ``modules_to_save`` via LLaMA-Factory's ``additional_target``, full
or freeze fine-tuning, a user's own trainer) change at every optimizer step, so the rule for them
(docs/how-it-works.md, "Trainable rows") is DropConnect's:

* the micro-batch computes with ``W * M``; the parameter is ``W``. By the chain rule
  ``dL/dW = M * dL/d(W * M)``: a dropped element gets NO gradient from that micro-batch. Masking
  in place makes autograd hand the parameter ``dL/d(W * M)`` instead, which is generally not 0
  where ``M`` is 0 (it is the gradient of the zero the forward used), so a gradient hook on the
  parameter multiplies it by ``M`` while the mask is on;
* the restore writes back the pre-mask ``W`` of this micro-batch (retaken at every mask), and the
  optimizer steps after the restore, on ``W``: every element keeps its update, a dropped one the
  update its optimizer makes of a zero gradient (momentum, Adam's moments, weight decay).

That needs the optimizer to step outside the masked span, on the very tensor masked. Where it
steps inside it (DeepSpeed inside ``training_step``, layer-wise GaLore/APOLLO inside backward) the
restore would write the pre-step rows over the update: an in-place write to a trainable weight
during the span (its autograd version counter moved) is :class:`RowsUpdatedWhileMaskedError`, and
the plugin refuses the known set-ups before anything loads. Storage backends that cannot retake
a snapshot cheaply or cut a gradient (ZeRO-3 partitions, FSDP shards, bitsandbytes 4-bit, which is
frozen anyway) refuse trainable rows (:class:`~.storage.UnsupportedStorageError`).

How a weight is stored (plain tensor, ZeRO-3 partition, FSDP1/FSDP2 shard, bitsandbytes 4-bit
codes) is the business of one backend class each, chosen by :func:`.storage.row_target`;
:class:`RowDropout` only sees the :class:`~.storage.RowTarget` interface.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from ..errors import MacDropError
from .storage import RowTarget, UnsupportedStorageError


def draw_keep_mask(
    shape: Sequence[int], p: float, generator: Optional[torch.Generator], device: torch.device | str
) -> torch.Tensor:
    """Element-wise keep-mask of Algorithm 1: keep where U > p, U ~ Uniform[0, 1)."""
    return torch.rand(tuple(shape), generator=generator, device=device) > p


class RowsUpdatedWhileMaskedError(MacDropError, RuntimeError):
    """A trainable weight was written in place while its rows were masked (an optimizer that steps
    inside the training step or inside backward): restoring would discard that update."""


class RowDropout:
    """Masks and restores the selected rows of several weights with ONE shared keep-mask.

    All targets must select the same number of rows of the same width (W_up and W_gate of one
    layer), because Algorithm 1 multiplies both by the same mask M of shape (k, d_hidden).
    """

    def __init__(self, targets: Sequence[RowTarget]) -> None:
        if not targets:
            raise ValueError("RowDropout needs at least one target")
        self.targets = list(targets)
        shapes = {t.mask_shape for t in self.targets}
        if len(shapes) != 1:
            raise ValueError(f"all targets must select rows of one shape, got {sorted(shapes)}")
        (self.mask_shape,) = shapes
        self._refuse_trainable_where_inexact()
        self.originals = [t.snapshot() for t in self.targets]
        self.device = self.targets[0].device
        self.active_mask: Optional[torch.Tensor] = None
        self._hooks: list = []
        self._versions: list[tuple[RowTarget, int]] = []

    @property
    def trainable(self) -> bool:
        """Whether any selected row is trainable right now (the weight requires a gradient)."""
        return any(t.trainable for t in self.targets)

    def trainable_names(self) -> list[str]:
        return [t.name for t in self.targets if t.trainable]

    def _refuse_trainable_where_inexact(self) -> None:
        for t in self.targets:
            if t.trainable and not t.keeps_updates:
                raise UnsupportedStorageError(
                    f"{t.name}: its rows are trainable (requires_grad) and stored as {t.backend}, where MacDrop "
                    "cannot keep the optimizer's update to them exactly (trainable rows need a plain tensor that "
                    "the optimizer steps outside the training step: no ZeRO-3, FSDP or 4-bit); freeze that weight "
                    "or train it without MacDrop"
                )

    # -------------------------------------------------------------- primitive operations
    def apply(self, keep: torch.Tensor) -> None:
        """Set rows := their current values * keep (no rescaling); for trainable rows, cut the
        gradient of the dropped elements until :meth:`restore`."""
        if tuple(keep.shape) != self.mask_shape:
            raise ValueError(f"keep-mask shape {tuple(keep.shape)} != {self.mask_shape}")
        self._refuse_trainable_where_inexact()  # a weight may have been unfrozen since (BAdam's blocks)
        # backends that can retake the snapshot cheaply always do: the rows as they are NOW, after
        # every optimizer step so far (frozen rows: bitwise the same copy as before)
        self.originals = [t.snapshot() if t.keeps_updates else o for t, o in zip(self.targets, self.originals)]
        for target, original in zip(self.targets, self.originals):
            target.apply_mask(original, keep)
        self.active_mask = keep
        for t in self.targets:
            if t.trainable:
                self._hooks.append(t.weight.register_hook(functools.partial(t.masked_grad, keep=keep)))
                self._versions.append((t, t.weight._version))

    def restore(self) -> None:
        """Put back the rows as they were when the mask was applied (bitwise)."""
        moved = [t.name for t, version in self._versions if t.weight._version != version]
        for target, original in zip(self.targets, self.originals):
            target.restore(original)
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._versions = [], []
        self.active_mask = None
        if moved:
            raise RowsUpdatedWhileMaskedError(
                f"{', '.join(dict.fromkeys(moved))} was updated in place while MacDrop had its rows masked (an "
                "optimizer that steps inside the training step or inside backward: DeepSpeed, layer-wise "
                "GaLore/APOLLO, LOMO); MacDrop cannot keep that update exactly, so the run stops: train these "
                "rows without MacDrop, or use a plain (DDP) optimizer step"
            )

    def is_restored(self) -> bool:
        """Whether every selected row equals the values it had when the last mask was applied, bit for bit."""
        return all(t.matches(o) for t, o in zip(self.targets, self.originals))

    # -------------------------------------------------------------- context managers
    @contextmanager
    def masked(self, p: float, generator: Optional[torch.Generator] = None) -> Iterator[Optional[torch.Tensor]]:
        """Draw a fresh mask for probability ``p``, apply it, and always restore on exit.

        ``p <= 0`` touches nothing (and draws nothing): MacDrop is free once the curriculum
        has decayed. Restoration happens on any exception too (OOM, KeyboardInterrupt, ...).
        """
        if p <= 0.0:
            yield None
            return
        keep = draw_keep_mask(self.mask_shape, p, generator, self.device)
        try:
            self.apply(keep)  # inside: if a later target's write fails, the earlier ones are restored
            yield keep
        finally:
            self.restore()

    @contextmanager
    def unmasked(self) -> Iterator[None]:
        """Temporarily show the original rows (e.g. DPO's reference forward), then re-mask."""
        keep = self.active_mask
        if keep is None:
            yield
            return
        try:
            self.restore()  # inside: a partial restore is undone by re-applying the mask
            yield
        finally:
            self.apply(keep)
