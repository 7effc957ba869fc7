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
sees exactly the values forward used. The saved copy is taken once: frozen weights do not change.

How a weight is stored (plain tensor, ZeRO-3 partition, FSDP1/FSDP2 shard, bitsandbytes 4-bit
codes) is the business of one backend class each, chosen by :func:`.storage.row_target`;
:class:`RowDropout` only sees the :class:`~.storage.RowTarget` interface.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from .storage import (  # re-exported: the storage backends live in .storage
    DenseRows,
    FSDP1Shard,
    FSDP1ShardRows,
    FSDP2Shard,
    FSDP2ShardRows,
    FSDPShard,
    Packed4bitRows,
    RowTarget,
    UnsupportedStorageError,
    Zero3PartitionRows,
    bits,
    find_fsdp_shard,
    is_packed_4bit,
    is_zero3_partitioned,
    logical_shape,
    readable_weights,
    row_target,
    uses_fsdp,
)

__all__ = [
    "RowDropout",
    "draw_keep_mask",
    "bits",
    "row_target",
    "RowTarget",
    "UnsupportedStorageError",
    "DenseRows",
    "Zero3PartitionRows",
    "FSDP1ShardRows",
    "FSDP2ShardRows",
    "Packed4bitRows",
    "FSDPShard",
    "FSDP1Shard",
    "FSDP2Shard",
    "find_fsdp_shard",
    "uses_fsdp",
    "readable_weights",
    "logical_shape",
    "is_packed_4bit",
    "is_zero3_partitioned",
]


def draw_keep_mask(
    shape: Sequence[int], p: float, generator: Optional[torch.Generator], device: torch.device | str
) -> torch.Tensor:
    """Element-wise keep-mask of Algorithm 1: keep where U > p, U ~ Uniform[0, 1)."""
    return torch.rand(tuple(shape), generator=generator, device=device) > p


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
        self.originals = [t.snapshot() for t in self.targets]
        self.device = self.targets[0].device
        self.active_mask: Optional[torch.Tensor] = None

    # -------------------------------------------------------------- primitive operations
    def apply(self, keep: torch.Tensor) -> None:
        """Set rows := original rows * keep (no rescaling)."""
        if tuple(keep.shape) != self.mask_shape:
            raise ValueError(f"keep-mask shape {tuple(keep.shape)} != {self.mask_shape}")
        for target, original in zip(self.targets, self.originals):
            target.apply_mask(original, keep)
        self.active_mask = keep

    def restore(self) -> None:
        """Put the saved original rows back (bitwise)."""
        for target, original in zip(self.targets, self.originals):
            target.restore(original)
        self.active_mask = None

    def is_restored(self) -> bool:
        """Whether every selected row equals its saved original bit for bit."""
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
