"""What ZeRO-3 partitions and FSDP shards have in common: each rank stores a slice of the
flattened weight, and edits only the selected elements its own slice holds.

No communication and nothing gathered per micro-step: every rank applies the same mask to the
elements it owns, so whatever the next gather assembles (forward, gradient-checkpoint
recomputation) is exactly ``original * mask``. When the weight happens to be gathered right now
(ZeRO-3 keeps small parameters gathered; FSDP may hold the unsharded weight), that copy is edited
too, so a write never misses the copy a forward uses.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import ValueRows, bits


class SlicedRows(ValueRows):
    """Base of the sliced backends; subclasses say where the slice and the gathered copy are."""

    @property
    def sharded(self) -> bool:
        return True

    # ------------------------------------------------------------------ what subclasses provide
    def _partition(self) -> torch.Tensor:
        """This rank's 1-D storage (what the next gather reads)."""
        raise NotImplementedError

    def _gathered_matrix(self) -> Optional[torch.Tensor]:
        """The whole weight (logical shape, all experts) while it is gathered right now, else None."""
        raise NotImplementedError

    def _read_sharded(self) -> torch.Tensor:
        """The selected rows while the weight is not gathered (a collective)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared arithmetic
    def _index_slice(self, start: int, count: int, base: int = 0) -> None:
        """This rank stores flat elements [start, start + count) of the parameter at
        ``base``, ``base + 1``, ... of its 1-D local storage: precompute which selected elements
        it owns (``_own``, positions in the flattened (k, d) rows) and where (``_local``)."""
        flat = self._flat_rows().flatten()
        local = flat - start
        own = (local >= 0) & (local < count)
        # index tensors, not boolean masks: boolean indexing on a GPU syncs to size its output,
        # and these are used twice per micro-step
        self._own = own.nonzero().flatten()
        self._local = (local.index_select(0, self._own) + base).to(self._partition().device)

    def _matrix(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.expert is None else full[self.expert]

    def read(self) -> torch.Tensor:
        """The selected rows (a copy). Gathers when the weight is not gathered: a collective (all
        ranks must call it), used at set-up and in checks, never per micro-step."""
        full = self._gathered_matrix()
        if full is not None:
            return self._select(self._matrix(full))
        return self._read_sharded()

    def write(self, rows: torch.Tensor) -> None:
        part = self._partition()
        own = rows.reshape(-1).index_select(0, self._own.to(rows.device)).to(device=part.device, dtype=part.dtype)
        part.index_copy_(0, self._local, own)
        full = self._gathered_matrix()
        if full is None:
            return
        matrix = self._matrix(full)
        rows = rows.to(device=matrix.device, dtype=matrix.dtype)
        matrix.index_copy_(self.axis, self.rows.to(matrix.device), rows if self.axis == 0 else rows.t())

    def matches(self, snapshot: torch.Tensor) -> bool:
        part = self._partition()
        own = (
            snapshot.reshape(-1).index_select(0, self._own.to(snapshot.device)).to(device=part.device, dtype=part.dtype)
        )
        if not torch.equal(bits(part.index_select(0, self._local)), bits(own)):
            return False
        full = self._gathered_matrix()
        if full is None:
            return True
        seen = self._select(self._matrix(full))
        return torch.equal(bits(seen), bits(snapshot.to(device=seen.device, dtype=seen.dtype)))
