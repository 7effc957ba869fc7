"""The plain case: a replicated floating-point tensor, edited with two ``index_copy_`` per step."""

from __future__ import annotations

import torch

from .base import ValueRows, bits


class DenseRows(ValueRows):
    """Rows of an ordinary weight tensor (``nn.Linear``, ``Conv1D``, fused experts) that every
    rank holds whole. Writes go through ``.data`` so autograd's version counter is not bumped."""

    backend = "dense"
    keeps_updates = True

    def _matrix(self) -> torch.Tensor:
        data = self.weight.data
        return data if self.expert is None else data[self.expert]

    def read(self) -> torch.Tensor:
        return self._select(self._matrix())

    def write(self, rows: torch.Tensor) -> None:
        matrix = self._matrix()
        rows = rows.to(device=matrix.device, dtype=matrix.dtype)
        matrix.index_copy_(self.axis, self.rows.to(matrix.device), rows if self.axis == 0 else rows.t())

    def matches(self, snapshot: torch.Tensor) -> bool:
        seen = self.read()
        return torch.equal(bits(seen), bits(snapshot.to(device=seen.device, dtype=seen.dtype)))

    def masked_grad(self, grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        out = grad.clone()  # a tensor hook must not modify the gradient it is handed
        matrix = out if self.expert is None else out[self.expert]
        rows = self.rows.to(matrix.device)
        seen = matrix.index_select(self.axis, rows)
        kept = keep.to(matrix.device)
        kept = kept if self.axis == 0 else kept.t()
        matrix.index_copy_(
            self.axis, rows, torch.where(kept, seen, torch.zeros((), dtype=seen.dtype, device=seen.device))
        )
        return out
