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
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch


@dataclass
class RowTarget:
    """Rows of one weight matrix that take part in the dropout.

    ``axis`` is the dimension that indexes the FFN's intermediate units: 0 for ``nn.Linear``
    ([out, in]), 1 for GPT-2's ``Conv1D`` ([in, out]). ``rows`` are those units' indices
    (already offset for fused matrices such as Phi-3's ``gate_up_proj``).
    """

    name: str
    weight: torch.Tensor
    rows: torch.Tensor
    axis: int = 0

    def __post_init__(self) -> None:
        self.rows = torch.as_tensor(self.rows, dtype=torch.long, device=self.weight.device)
        if self.axis not in (0, 1) or self.weight.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D weight and axis 0 or 1")
        n = self.weight.shape[self.axis]
        if self.rows.numel() == 0 or int(self.rows.min()) < 0 or int(self.rows.max()) >= n:
            raise ValueError(f"{self.name}: row indices must lie in [0, {n}), got {self.rows.tolist()[:8]}")

    def read(self) -> torch.Tensor:
        """The selected rows as a (len(rows), d) tensor (a copy)."""
        out = self.weight.data.index_select(self.axis, self.rows)
        return out if self.axis == 0 else out.t()

    def write(self, rows: torch.Tensor) -> None:
        """Write a (len(rows), d) tensor back into the selected rows, in place, untracked."""
        self.weight.data.index_copy_(self.axis, self.rows, rows if self.axis == 0 else rows.t())


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Reinterpret a tensor's storage as integers, so equality is bitwise (NaN, -0.0 included)."""
    if not tensor.is_floating_point():
        return tensor
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(int_type)


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
        self.originals = [t.read().clone() for t in self.targets]
        shapes = {tuple(o.shape) for o in self.originals}
        if len(shapes) != 1:
            raise ValueError(f"all targets must select rows of one shape, got {sorted(shapes)}")
        (self.mask_shape,) = shapes
        self.device = self.originals[0].device
        self.active_mask: Optional[torch.Tensor] = None

    # -------------------------------------------------------------- primitive operations
    def apply(self, keep: torch.Tensor) -> None:
        """Set rows := original rows * keep (no rescaling)."""
        if tuple(keep.shape) != self.mask_shape:
            raise ValueError(f"keep-mask shape {tuple(keep.shape)} != {self.mask_shape}")
        for target, original in zip(self.targets, self.originals):
            target.write(original * keep.to(device=original.device, dtype=original.dtype))
        self.active_mask = keep

    def restore(self) -> None:
        """Put the saved original rows back (bitwise)."""
        for target, original in zip(self.targets, self.originals):
            target.write(original)
        self.active_mask = None

    def is_restored(self) -> bool:
        """Whether every selected row equals its saved original bit for bit."""
        return all(torch.equal(bits(t.read()), bits(o)) for t, o in zip(self.targets, self.originals))

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
        self.apply(keep)
        try:
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
        self.restore()
        try:
            yield
        finally:
            self.apply(keep)
