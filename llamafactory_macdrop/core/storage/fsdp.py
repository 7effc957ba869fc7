"""FSDP1 and FSDP2: each rank keeps a slice of every weight and all-gathers the whole weight
right before the forward of its unit (and again when gradient checkpointing recomputes it).

:class:`FSDPShard` describes FSDP's own storage of one weight (:func:`find_fsdp_shard` finds it
from the model's FSDP modules); :class:`FSDP1ShardRows` / :class:`FSDP2ShardRows` are the
backends that edit it. FSDP2 keeps dim-0 slices of the weight per rank (a DTensor, ``Shard(0)``,
padded), FSDP1 a contiguous slice of a FlatParameter that concatenates several flattened weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from .base import logical_shape
from .sliced import SlicedRows


class FSDPShard:
    """Where FSDP keeps this rank's part of one weight.

    ``local()`` is a 1-D tensor whose elements ``base + i`` hold elements ``start + i``
    (i < ``count``) of the row-major flattened full weight of shape ``shape``; it is what the next
    all-gather reads. ``unsharded()`` is the full weight the module computes with when FSDP has
    it gathered right now (edits must reach it too), else None.
    """

    shape: torch.Size
    version: int  # 1 or 2: which backend edits it
    start: int
    count: int
    base: int
    group: object

    def local(self) -> torch.Tensor:
        raise NotImplementedError

    def unsharded(self) -> Optional[torch.Tensor]:
        raise NotImplementedError


class FSDP2Shard(FSDPShard):
    """FSDP2 (``fully_shard``): the weight is a DTensor ``Shard(0)``; rank r holds rows
    [r*c, (r+1)*c) with c = ceil(n0 / world) (``torch.chunk``), stored zero-padded to c rows in
    ``FSDPParam._sharded_param_data``, which each all-gather reads (casting to ``param_dtype``
    and copying from the CPU under offload as it goes)."""

    version = 2

    def __init__(self, fsdp_param) -> None:
        placement = fsdp_param.fsdp_placement
        if getattr(placement, "dim", None) != 0:
            raise ValueError(f"FSDP2 sharding {placement} is not supported (only Shard(0), FSDP's default)")
        self.param = fsdp_param
        self.shape = torch.Size(fsdp_param._orig_size)
        rows_per_rank = int(fsdp_param.padded_sharded_param_size[0])
        row_numel = self.shape.numel() // self.shape[0] if self.shape[0] else 0
        rank = fsdp_param.mesh_info.shard_mesh_rank
        self.start = rank * rows_per_rank * row_numel
        self.count = int(torch.Size(fsdp_param.sharded_size).numel())
        self.base = 0
        self.group = fsdp_param.mesh_info.shard_process_group
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

        self._states = ShardedState  # looked up once: unsharded() runs twice per target per micro-step

    def local(self) -> torch.Tensor:
        return self.param._sharded_param_data

    def unsharded(self) -> Optional[torch.Tensor]:
        state = self.param.sharded_state
        if state == self._states.SHARDED:
            return None
        if state == self._states.UNSHARDED:
            return self.param.unsharded_param.data
        raise RuntimeError(f"FSDP2 parameter in state {state}: reshard_after_forward=<int> is not supported by MacDrop")


class FSDP1Shard(FSDPShard):
    """FSDP1 (``FullyShardedDataParallel``): the weight is parameter ``index`` of a FlatParameter
    (the concatenation of a wrapped module's flattened weights, padded); each rank holds a
    contiguous slice, ``_local_shard``, that each unshard reads (through ``_mp_shard`` under mixed
    precision, from the CPU under offload). ``_shard_param_infos`` says which part of the weight
    the slice holds. Under NO_SHARD (also FULL_SHARD on one rank: FSDP1 switches) the slice is the
    whole FlatParameter."""

    version = 1

    def __init__(self, handle, index: int) -> None:
        flat = handle.flat_param
        self.handle = handle
        self.info = flat._param_infos[index]
        self.shape = torch.Size(flat._shapes[index])
        shard = flat._shard_param_infos[index]
        if shard.in_shard:
            self.start, self.count, self.base = shard.intra_param_start_idx, shard.numel_in_shard, shard.offset_in_shard
        else:
            self.start, self.count, self.base = 0, 0, 0
        self.group = handle.process_group
        from torch.distributed.fsdp._flat_param import HandleTrainingState

        self._summoning = HandleTrainingState.SUMMON_FULL_PARAMS  # looked up once (hot path below)

    def local(self) -> torch.Tensor:
        return self.handle.flat_param._local_shard

    def unsharded(self) -> Optional[torch.Tensor]:
        if self.handle._training_state == self._summoning:  # set-up reads the rows
            view = getattr(self.info.module, self.info.param_name).data
            if view.shape != self.shape:
                raise RuntimeError(
                    f"FSDP1 shows {self.info.module_name}.{self.info.param_name} with shape "
                    f"{tuple(view.shape)} in summon_full_params; expected {tuple(self.shape)}"
                )
            return view
        if not self.handle.uses_sharded_strategy:
            # NO_SHARD (what FSDP1 makes of FULL_SHARD on a single rank): the flat parameter is
            # the whole weight and the module's views point into it; editing it is enough
            return None
        if self.handle.needs_unshard():  # the next forward all-gathers from _local_shard
            return None
        # FSDP1 kept a gathered copy that the next forward would reuse without reading the shards
        # (SHARD_GRAD_OP, HYBRID_SHARD_ZERO2, or a weight in the root unit)
        raise RuntimeError(
            f"FSDP1 keeps {self.info.module_name}.{self.info.param_name} gathered between forward and backward; "
            "MacDrop needs fsdp_sharding_strategy FULL_SHARD with the decoder layers wrapped "
            "(fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP), or FSDP2"
        )


def find_fsdp_shard(model: torch.nn.Module, weight: torch.Tensor) -> Optional[FSDPShard]:
    """FSDP's storage of ``weight`` (a parameter or, for FSDP1 without ``use_orig_params``, the
    view the module exposes while its parameters are gathered), or None when FSDP does not own it."""
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)  # FSDP2 (fully_shard) module
        if callable(get_state):
            group = get_state()._fsdp_param_group
            for fsdp_param in getattr(group, "fsdp_params", None) or []:
                # the module shows the unsharded param while FSDP2 holds it gathered
                # (reshard_after_forward=false after a forward, e.g. the locator's probe)
                if fsdp_param.sharded_param is weight or getattr(fsdp_param, "_unsharded_param", None) is weight:
                    return FSDP2Shard(fsdp_param)
        handle = getattr(module, "_handle", None)  # FSDP1 FullyShardedDataParallel
        flat = getattr(handle, "flat_param", None)
        if flat is not None and hasattr(flat, "_param_infos"):
            for index, info in enumerate(flat._param_infos):
                if getattr(info.module, info.param_name, None) is weight:
                    return FSDP1Shard(handle, index)
    return None


def uses_fsdp(model: torch.nn.Module) -> int:
    """0 when no module of ``model`` is FSDP-managed, else the FSDP version (1 or 2)."""
    for module in model.modules():
        if callable(getattr(module, "_get_fsdp_state", None)):
            return 2
        if hasattr(getattr(getattr(module, "_handle", None), "flat_param", None), "_param_infos"):
            return 1
    return 0


@contextmanager
def readable_weights(model: torch.nn.Module) -> Iterator[None]:
    """While set-up builds its targets: FSDP1 weights shown whole (``summon_full_params``, a
    collective, no writeback), so they have their real shapes and the rows can be read once.
    FSDP2 DTensors report their real shapes; FSDP2 modules are resharded first, because with
    ``reshard_after_forward=false`` the locator's no-grad probe leaves them gathered, and training
    must start from the state it starts from without MacDrop (every param sharded)."""
    version = uses_fsdp(model)
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            yield
        return
    if version == 2:
        for module in model.modules():
            if callable(getattr(module, "_get_fsdp_state", None)):
                module.reshard()
    yield


class _FSDPShardRows(SlicedRows):
    """Rows of a weight FSDP shards: this rank edits the elements of the selected rows that lie
    in its own slice (``shard``); every all-gather then assembles exactly ``original * mask``.
    Build it while the rows can still be read (inside :func:`readable_weights`, at set-up)."""

    version = 0

    def __init__(self, name, weight, rows, axis=0, expert=None, *, shard: FSDPShard) -> None:
        if tuple(shard.shape) != tuple(logical_shape(weight)):
            raise ValueError(f"{name}: FSDP reports shape {tuple(shard.shape)}, the module {tuple(weight.shape)}")
        super().__init__(name, weight, rows, axis, expert, shape=shard.shape)
        self.shard = shard
        self._index_slice(shard.start, shard.count, shard.base)

    def _partition(self) -> torch.Tensor:
        # through .data, as the dense and ZeRO-3 backends write: no autograd version bump on the
        # shard (tests/core/test_storage_contract.py holds every backend to that)
        return self.shard.local().data

    def _gathered_matrix(self) -> Optional[torch.Tensor]:
        return self.shard.unsharded()

    def _read_sharded(self) -> torch.Tensor:
        return self._gather_rows()

    def _gather_rows(self) -> torch.Tensor:
        """The selected rows assembled from every rank's shard: each rank contributes the
        elements it owns, each element is taken from its owner (bitwise, -0.0 included). A
        collective over k x d numbers, not over the matrix."""
        import torch.distributed as dist

        local = self._partition()
        n = self.mask_shape[0] * self.mask_shape[1]
        values = torch.zeros(n, dtype=local.dtype, device=local.device)
        owned = torch.zeros(n, dtype=torch.uint8, device=local.device)  # uint8: NCCL has no bool
        own = self._own.to(local.device)
        values[own] = local.index_select(0, self._local)
        owned[own] = 1
        group = self.shard.group
        world = dist.get_world_size(group)
        all_values = [torch.empty_like(values) for _ in range(world)]
        all_owned = [torch.empty_like(owned) for _ in range(world)]
        dist.all_gather(all_values, values, group=group)
        dist.all_gather(all_owned, owned, group=group)
        out = torch.zeros_like(values)
        found = torch.zeros(n, dtype=torch.bool, device=local.device)
        for v, o in zip(all_values, all_owned):
            out = torch.where(o.bool(), v, out)
            found |= o.bool()
        if not bool(found.all()):
            raise RuntimeError(f"{self.name}: no rank holds some of the selected elements (FSDP layout not understood)")
        return out.view(self.mask_shape).to(self.device)


class FSDP1ShardRows(_FSDPShardRows):
    """FSDP1 (``FullyShardedDataParallel``): the slice of a FlatParameter (:class:`FSDP1Shard`)."""

    backend = "fsdp1-shard"
    version = 1


class FSDP2ShardRows(_FSDPShardRows):
    """FSDP2 (``fully_shard``): the padded dim-0 shard of a DTensor (:class:`FSDP2Shard`)."""

    backend = "fsdp2-shard"
    version = 2
