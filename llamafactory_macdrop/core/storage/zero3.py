"""DeepSpeed ZeRO-3: the parameter is one flat tensor split into per-rank partitions
(``param.ds_tensor``), gathered only around its module's forward/backward."""

from __future__ import annotations

from typing import Optional

import torch

from .sliced import SlicedRows


class Zero3PartitionRows(SlicedRows):
    """Rows of a ZeRO-3 partitioned parameter: this rank edits the elements of the selected rows
    that lie in its own partition (flat offset minus ``rank * partition_size``). A parameter
    ZeRO-3 currently holds gathered (``stage3_param_persistence_threshold``) is edited in its
    gathered copy too. Reading the rows gathers the parameter once (set-up and checks only)."""

    backend = "zero3-partition"
    zero3 = True

    def __init__(self, name, weight, rows, axis=0, expert=None) -> None:
        super().__init__(name, weight, rows, axis, expert, shape=weight.ds_shape, device=weight.ds_tensor.device)
        import deepspeed.comm as dist

        part = weight.ds_tensor
        size = int(getattr(part, "ds_numel", part.numel()))
        start = size * dist.get_rank(group=weight.ds_process_group)
        self._index_slice(start, max(0, min(size, int(weight.ds_numel) - start)))

    def _partition(self) -> torch.Tensor:
        return self.weight.ds_tensor.data.view(-1)

    def _gathered_matrix(self) -> Optional[torch.Tensor]:
        data = self.weight.data
        return data.view(self.full_shape) if data.numel() == self.weight.ds_numel else None

    def _read_sharded(self) -> torch.Tensor:
        import deepspeed

        with deepspeed.zero.GatheredParameters([self.weight], modifier_rank=None):
            return self._select(self._matrix(self._gathered_matrix())).clone()
