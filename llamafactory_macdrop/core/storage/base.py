"""The interface every storage backend implements, and the pieces they share."""

from __future__ import annotations

from typing import Any, Optional

import torch


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Reinterpret a tensor's storage as integers, so equality is bitwise (NaN, -0.0 included)."""
    if not tensor.is_floating_point():
        return tensor
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(int_type)


def logical_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's real shape, also when DeepSpeed ZeRO-3 has partitioned it (``.shape`` is [0])
    or bitsandbytes has packed it into 4-bit codes (``.shape`` is [numel / 2, 1] or another
    packing; ``quant_state.shape`` is the real one)."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return torch.Size(quant_state.shape)
    return getattr(weight, "ds_shape", None) or weight.shape


class RowTarget:
    """Rows of one weight matrix that take part in the dropout (the interface of every backend).

    ``axis`` is the dimension that indexes the FFN's intermediate units: 0 for ``nn.Linear``
    ([out, in]), 1 for GPT-2's ``Conv1D`` ([in, out]). ``rows`` are those units' indices
    (already offset for fused matrices such as Phi-3's ``gate_up_proj``). ``expert`` picks one
    matrix of a 3-D weight (fused MoE experts, [E, out, in]).

    What :class:`~llamafactory_macdrop.core.masking.RowDropout` uses: ``snapshot()`` (the state
    ``restore`` puts back), then per micro-batch ``apply_mask(snapshot, keep)`` (rows := original
    rows * keep, no rescaling) and ``restore(snapshot)``; ``matches(snapshot)`` checks bitwise
    restoration. ``read()`` returns the rows as the layer computes with them (set-up, checks).
    Backends make the per-step calls cheap: index tensors are computed once at construction.

    Trainable rows (the weight has ``requires_grad``: peft's ``modules_to_save``, full or freeze
    fine-tuning, a user's own trainer) change between micro-batches, so their snapshot must be
    retaken at every mask and the gradient of the dropped elements cut (``masked_grad``): only
    backends with ``keeps_updates`` can do both exactly; :class:`RowDropout` refuses the others.
    """

    #: whether the snapshot is cheap enough to retake at every mask (a local read of k rows, no
    #: collective) and ``masked_grad`` is implemented: what trainable rows need (docs/how-it-works.md)
    keeps_updates: bool = False

    #: the backend's name, as :func:`~.factory.row_target` reports it
    backend: str = ""
    #: kept for readers of older traces (tests/dist_check.py): True only for ZeRO-3 partitions
    zero3: bool = False
    #: the FSDP storage (an :class:`~.fsdp.FSDPShard`) for the FSDP backends, else None
    shard: Any = None

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        rows,
        axis: int = 0,
        expert: Optional[int] = None,
        *,
        shape: Optional[torch.Size] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        self.name, self.weight, self.axis, self.expert = name, weight, axis, expert
        full = torch.Size(shape if shape is not None else logical_shape(weight))
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=device if device is not None else weight.device)
        matrix = full if expert is None else full[1:]
        if axis not in (0, 1) or len(matrix) != 2:
            raise ValueError(f"{name}: expected a 2-D weight (or one expert of a 3-D one) and axis 0 or 1")
        if expert is not None and not 0 <= expert < full[0]:
            raise ValueError(f"{name}: expert {expert} not in [0, {full[0]})")
        self.full_shape = full
        self.shape = torch.Size(matrix)
        n = matrix[axis]
        if self.rows.numel() == 0 or int(self.rows.min()) < 0 or int(self.rows.max()) >= n:
            raise ValueError(f"{name}: row indices must lie in [0, {n}), got {self.rows.tolist()[:8]}")

    # ------------------------------------------------------------------ what RowDropout uses
    @property
    def mask_shape(self) -> tuple[int, int]:
        return (int(self.rows.numel()), int(self.shape[1 - self.axis]))

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def sharded(self) -> bool:
        """Whether this rank holds only part of the weight (ZeRO-3 partition or FSDP shard)."""
        return False

    @property
    def trainable(self) -> bool:
        """Whether the optimizer updates this weight (it requires a gradient) right now."""
        return bool(getattr(self.weight, "requires_grad", False))

    def describe(self) -> str:
        """One line: the weight and the backend that edits it (logged at set-up)."""
        return f"{self.name} -> {self.backend}"

    def snapshot(self) -> Any:
        """The state :meth:`restore` puts back, taken once (frozen weights do not change)."""
        raise NotImplementedError

    def apply_mask(self, snapshot: Any, keep: torch.Tensor) -> None:
        """Rows := original rows * keep (Algorithm 1: no rescaling), in place, untracked."""
        raise NotImplementedError

    def restore(self, snapshot: Any) -> None:
        raise NotImplementedError

    def matches(self, snapshot: Any) -> bool:
        """Whether the stored rows equal the snapshot bit for bit (local check, no communication)."""
        raise NotImplementedError

    def read(self) -> torch.Tensor:
        """The selected rows as a (len(rows), d) tensor (a copy), as the layer computes with them."""
        raise NotImplementedError

    def masked_grad(self, grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``grad`` (the whole weight's gradient) with the dropped elements of the selected rows set
        to 0: the chain rule through ``rows * keep`` (backends with ``keeps_updates``)."""
        raise NotImplementedError(f"{self.name}: the {self.backend} backend cannot mask trainable rows")

    def write(self, rows: torch.Tensor) -> None:
        """Write a (len(rows), d) tensor into the selected rows (backends that store values)."""
        raise NotImplementedError(
            f"{self.name}: the {self.backend} backend can mask and restore rows, not overwrite them"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()} rows={self.rows.tolist()[:8]}>"

    # ------------------------------------------------------------------ shared helpers
    def _select(self, matrix: torch.Tensor) -> torch.Tensor:
        out = matrix.index_select(self.axis, self.rows.to(matrix.device))
        return out if self.axis == 0 else out.t()

    def _flat_rows(self) -> torch.Tensor:
        """Flat offsets, in the row-major flattened parameter, of the selected rows' elements (k, d)."""
        rows, (n0, n1) = self.rows, self.shape
        if self.axis == 0:  # element (row, j) of an [n0, n1] matrix
            flat = rows[:, None] * n1 + torch.arange(n1, device=rows.device)[None, :]
        else:  # element (j, row): the selected units index the columns
            flat = torch.arange(n0, device=rows.device)[None, :] * n1 + rows[:, None]
        if self.expert is not None:
            flat = flat + self.expert * n0 * n1
        return flat


class ValueRows(RowTarget):
    """Backends that store the rows' VALUES (dense, sliced): the snapshot is the original rows,
    masking writes ``original * keep``, restoring writes the original back."""

    def snapshot(self) -> torch.Tensor:
        return self.read().clone()

    def apply_mask(self, snapshot: torch.Tensor, keep: torch.Tensor) -> None:
        self.write(snapshot * keep.to(device=snapshot.device, dtype=snapshot.dtype))

    def restore(self, snapshot: torch.Tensor) -> None:
        self.write(snapshot)
