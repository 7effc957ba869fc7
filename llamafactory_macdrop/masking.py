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


def logical_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's real shape, also when DeepSpeed ZeRO-3 has partitioned it (``.shape`` is [0])
    or bitsandbytes has packed it into 4-bit codes (``.shape`` is [numel / 2, 1])."""
    if is_packed_4bit(weight):
        return torch.Size(weight.quant_state.shape)
    return getattr(weight, "ds_shape", None) or weight.shape


def is_packed_4bit(weight: torch.Tensor) -> bool:
    """A bitsandbytes ``Params4bit`` after quantization (QLoRA's frozen base weight)."""
    return getattr(weight, "quant_state", None) is not None and weight.dtype == torch.uint8


def is_zero3_partitioned(weight: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 owns this parameter (its values live in per-rank partitions)."""
    return getattr(weight, "ds_tensor", None) is not None and hasattr(weight, "ds_numel")


@dataclass
class RowTarget:
    """Rows of one weight matrix that take part in the dropout.

    ``axis`` is the dimension that indexes the FFN's intermediate units: 0 for ``nn.Linear``
    ([out, in]), 1 for GPT-2's ``Conv1D`` ([in, out]). ``rows`` are those units' indices
    (already offset for fused matrices such as Phi-3's ``gate_up_proj``). ``expert`` picks one
    matrix of a 3-D weight (fused MoE experts, [E, out, in]).

    Under DeepSpeed ZeRO-3 the parameter is a flat tensor split into one partition per rank and
    gathered only around each module's forward/backward. Editing rows then means editing, on
    every rank, only the elements of those rows that its OWN partition holds: no communication,
    nothing gathered per micro-step, and the gathered weight every rank sees in forward and
    backward is exactly ``original * mask`` (all ranks apply the same mask). A parameter that is
    currently gathered (ZeRO-3 keeps small ones gathered: ``stage3_param_persistence_threshold``)
    is edited in its gathered copy too.
    """

    name: str
    weight: torch.Tensor
    rows: torch.Tensor
    axis: int = 0
    expert: Optional[int] = None

    def __new__(cls, name, weight, *args, **kwargs):
        if cls is RowTarget and is_packed_4bit(weight):
            cls = Packed4bitRowTarget
        return object.__new__(cls)

    def __post_init__(self) -> None:
        full = logical_shape(self.weight)
        self.zero3 = is_zero3_partitioned(self.weight)
        device = self.weight.ds_tensor.device if self.zero3 else self.weight.device
        self.rows = torch.as_tensor(self.rows, dtype=torch.long, device=device)
        shape = full if self.expert is None else full[1:]
        if self.axis not in (0, 1) or len(shape) != 2:
            raise ValueError(f"{self.name}: expected a 2-D weight (or one expert of a 3-D one) and axis 0 or 1")
        if self.expert is not None and not 0 <= self.expert < full[0]:
            raise ValueError(f"{self.name}: expert {self.expert} not in [0, {full[0]})")
        self.shape = torch.Size(shape)
        n = shape[self.axis]
        if self.rows.numel() == 0 or int(self.rows.min()) < 0 or int(self.rows.max()) >= n:
            raise ValueError(f"{self.name}: row indices must lie in [0, {n}), got {self.rows.tolist()[:8]}")
        if self.zero3:
            self._locate_in_partition()

    # -------------------------------------------------------------- dense (replicated) storage
    def _matrix(self) -> torch.Tensor:
        data = self.weight.data
        if self.zero3:
            data = data.view(logical_shape(self.weight))
        return data if self.expert is None else data[self.expert]

    def _gathered(self) -> bool:
        return not self.zero3 or self.weight.data.numel() == self.weight.ds_numel

    # -------------------------------------------------------------- ZeRO-3 partition
    def _locate_in_partition(self) -> None:
        """Which elements of the selected rows this rank's partition holds, and where."""
        import deepspeed.comm as dist

        rows, (n0, n1) = self.rows, self.shape
        if self.axis == 0:  # element (row, j) of an [n0, n1] matrix
            flat = rows[:, None] * n1 + torch.arange(n1, device=rows.device)[None, :]
        else:  # element (j, row): the selected units index the columns
            flat = torch.arange(n0, device=rows.device)[None, :] * n1 + rows[:, None]
        if self.expert is not None:
            flat = flat + self.expert * n0 * n1
        part = self.weight.ds_tensor
        size = int(getattr(part, "ds_numel", part.numel()))
        start = size * dist.get_rank(group=self.weight.ds_process_group)
        local = (flat - start).flatten()
        own = (local >= 0) & (local < size) & (flat.flatten() < self.weight.ds_numel)
        # index tensors, not boolean masks: boolean indexing on a GPU syncs to size its output,
        # and these are used twice per micro-step
        self._own = own.nonzero().flatten()  # positions in the flattened (k, d) rows
        self._local = local.index_select(0, self._own)  # the same elements in this partition

    def _partition(self) -> torch.Tensor:
        return self.weight.ds_tensor.data.view(-1)

    # -------------------------------------------------------------- read / write
    def read(self) -> torch.Tensor:
        """The selected rows as a (len(rows), d) tensor (a copy).

        Under ZeRO-3 this gathers the parameter once (a collective: all ranks must call it);
        it is used at set-up and in checks, never per micro-step.
        """
        if self._gathered():
            return self._select(self._matrix())
        import deepspeed

        with deepspeed.zero.GatheredParameters([self.weight], modifier_rank=None):
            return self._select(self._matrix())

    def _select(self, matrix: torch.Tensor) -> torch.Tensor:
        out = matrix.index_select(self.axis, self.rows)
        return out if self.axis == 0 else out.t()

    def write(self, rows: torch.Tensor) -> None:
        """Write a (len(rows), d) tensor back into the selected rows, in place, untracked."""
        if self.zero3:
            part = self._partition()
            part.index_copy_(0, self._local, rows.reshape(-1).index_select(0, self._own).to(part.dtype))
            if not self._gathered():
                return
        self._matrix().index_copy_(self.axis, self.rows, rows if self.axis == 0 else rows.t())

    def matches(self, rows: torch.Tensor) -> bool:
        """Whether the stored rows equal ``rows`` bit for bit (local check, no communication)."""
        own = rows.reshape(-1).index_select(0, self._own) if self.zero3 else None
        if self.zero3 and not torch.equal(bits(self._partition().index_select(0, self._local)), bits(own)):
            return False
        return not self._gathered() or torch.equal(bits(self._select(self._matrix())), bits(rows))

    # -------------------------------------------------------------- what RowDropout uses
    @property
    def mask_shape(self) -> tuple[int, int]:
        return (int(self.rows.numel()), int(self.shape[1 - self.axis]))

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def snapshot(self) -> torch.Tensor:
        """The state :meth:`restore` puts back (here: the rows' values)."""
        return self.read().clone()

    def apply_mask(self, snapshot: torch.Tensor, keep: torch.Tensor) -> None:
        """Rows := original rows * keep (Algorithm 1: no rescaling)."""
        self.write(snapshot * keep.to(device=snapshot.device, dtype=snapshot.dtype))

    def restore(self, snapshot: torch.Tensor) -> None:
        self.write(snapshot)


class Packed4bitRowTarget(RowTarget):
    """Rows of a bitsandbytes 4-bit weight (QLoRA), masked by editing the 4-bit codes.

    Re-quantizing ``W * M`` would change the kept elements too. But both NF4 and FP4 have an
    exact zero code and a dequantized element is ``code_value * block_absmax``: setting the code
    of every dropped element to the zero code, and leaving the kept elements' codes alone, gives
    exactly Algorithm 1's effective weight ``dequant(W) * M``, bit for bit. Restoring writes the
    saved bytes back. Layout (bitsandbytes): element i of the row-major [out, in] weight is the
    high nibble of byte i // 2 when i is even, the low nibble when odd.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero3 or self.expert is not None or self.axis != 0:
            raise ValueError(f"{self.name}: 4-bit weights are supported for plain nn.Linear rows only")
        code = self.weight.quant_state.code
        zeros = (code == 0).nonzero().flatten() if code is not None else torch.empty(0)
        if zeros.numel() == 0:
            raise ValueError(f"{self.name}: this 4-bit quantization has no exact zero code; cannot mask rows exactly")
        self.zero_code = int(zeros[0])
        n1 = self.shape[1]
        flat = self.rows[:, None] * n1 + torch.arange(n1, device=self.rows.device)[None, :]
        self._byte = flat // 2
        self._high = flat % 2 == 0
        self._bytes = torch.unique(self._byte)

    def _codes(self) -> torch.Tensor:
        return self.weight.data.view(-1)

    def read(self) -> torch.Tensor:
        """The selected rows, dequantized (what the layer computes with)."""
        import bitsandbytes.functional as bnb_f

        full = bnb_f.dequantize_4bit(self.weight.data, self.weight.quant_state)
        return full.view(self.shape).index_select(0, self.rows)

    def write(self, rows: torch.Tensor) -> None:
        raise NotImplementedError(f"{self.name}: 4-bit rows can be masked and restored, not overwritten")

    def snapshot(self) -> torch.Tensor:
        return self._codes()[self._bytes].clone()

    def apply_mask(self, snapshot: torch.Tensor, keep: torch.Tensor) -> None:
        codes = self._codes()
        codes[self._bytes] = snapshot  # start from the original bytes
        original = codes[self._byte]
        nibble = torch.where(self._high, original >> 4, original & 0x0F)
        nibble = torch.where(keep.to(self.device), nibble, torch.full_like(nibble, self.zero_code))
        hi, lo = self._high, ~self._high
        codes[self._byte[hi]] = (codes[self._byte[hi]] & 0x0F) | (nibble[hi] << 4)
        codes[self._byte[lo]] = (codes[self._byte[lo]] & 0xF0) | nibble[lo]

    def restore(self, snapshot: torch.Tensor) -> None:
        self._codes()[self._bytes] = snapshot

    def matches(self, snapshot: torch.Tensor) -> bool:
        return torch.equal(self._codes()[self._bytes], snapshot)


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
