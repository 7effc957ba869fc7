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

    Under FSDP the same idea applies to FSDP's own storage, described by ``shard`` (see
    :func:`find_fsdp_shard`; :func:`bind_fsdp_shards` attaches it after construction): FSDP2 keeps
    dim-0 slices of the weight per rank (a DTensor, ``Shard(0)``, padded), FSDP1 a contiguous slice
    of a FlatParameter that concatenates several flattened weights. Each rank edits the elements
    of the selected rows that lie in its own slice; every all-gather (forward, gradient-checkpoint
    recomputation) then assembles exactly ``original * mask``.
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
        self.shard: Optional[FSDPShard] = None
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
        if self.shard is not None:
            data = self.shard.unsharded()
        else:
            data = self.weight.data
        if self.zero3:
            data = data.view(logical_shape(self.weight))
        return data if self.expert is None else data[self.expert]

    def _gathered(self) -> bool:
        if self.shard is not None:
            return self.shard.unsharded() is not None
        return not self.zero3 or self.weight.data.numel() == self.weight.ds_numel

    @property
    def sharded(self) -> bool:
        """Whether this rank holds only part of the weight (ZeRO-3 partition or FSDP shard)."""
        return self.zero3 or self.shard is not None

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

    # -------------------------------------------------------------- ZeRO-3 partition
    def _locate_in_partition(self) -> None:
        """Which elements of the selected rows this rank's partition holds, and where."""
        import deepspeed.comm as dist

        part = self.weight.ds_tensor
        size = int(getattr(part, "ds_numel", part.numel()))
        start = size * dist.get_rank(group=self.weight.ds_process_group)
        self._index_slice(start, max(0, min(size, int(self.weight.ds_numel) - start)))

    def bind_shard(self, shard: "FSDPShard") -> None:
        """Use FSDP's storage of this weight (call while the rows can still be read: at set-up)."""
        if self.zero3:
            raise ValueError(f"{self.name}: a parameter cannot be both ZeRO-3 partitioned and FSDP sharded")
        if tuple(shard.shape) != tuple(logical_shape(self.weight)):
            raise ValueError(
                f"{self.name}: FSDP reports shape {tuple(shard.shape)}, the module {tuple(self.weight.shape)}"
            )
        self.shard = shard
        self._index_slice(shard.start, shard.count, shard.base)

    def _partition(self) -> torch.Tensor:
        if self.shard is not None:
            return self.shard.local()
        return self.weight.ds_tensor.data.view(-1)

    # -------------------------------------------------------------- read / write
    def read(self) -> torch.Tensor:
        """The selected rows as a (len(rows), d) tensor (a copy).

        Under ZeRO-3 this gathers the parameter once (a collective: all ranks must call it);
        it is used at set-up and in checks, never per micro-step.
        """
        if self._gathered():
            return self._select(self._matrix())
        if self.shard is not None:
            return self._gather_rows()
        import deepspeed

        with deepspeed.zero.GatheredParameters([self.weight], modifier_rank=None):
            return self._select(self._matrix())

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

    def _select(self, matrix: torch.Tensor) -> torch.Tensor:
        out = matrix.index_select(self.axis, self.rows)
        return out if self.axis == 0 else out.t()

    def write(self, rows: torch.Tensor) -> None:
        """Write a (len(rows), d) tensor back into the selected rows, in place, untracked."""
        if self.sharded:
            part = self._partition()
            own = rows.reshape(-1).index_select(0, self._own).to(device=part.device, dtype=part.dtype)
            part.index_copy_(0, self._local, own)
            if not self._gathered():
                return
        matrix = self._matrix()
        rows = rows.to(device=matrix.device, dtype=matrix.dtype)
        matrix.index_copy_(self.axis, self.rows.to(matrix.device), rows if self.axis == 0 else rows.t())

    def matches(self, rows: torch.Tensor) -> bool:
        """Whether the stored rows equal ``rows`` bit for bit (local check, no communication)."""
        if self.sharded:
            part = self._partition()
            own = rows.reshape(-1).index_select(0, self._own).to(device=part.device, dtype=part.dtype)
            if not torch.equal(bits(part.index_select(0, self._local)), bits(own)):
                return False
        if not self._gathered():
            return True
        seen = self._select(self._matrix())
        return torch.equal(bits(seen), bits(rows.to(device=seen.device, dtype=seen.dtype)))

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


# ----------------------------------------------------------------------------- FSDP storage
class FSDPShard:
    """Where FSDP keeps this rank's part of one weight.

    ``local()`` is a 1-D tensor whose elements ``base + i`` hold elements ``start + i``
    (i < ``count``) of the row-major flattened full weight of shape ``shape``; it is what the next
    all-gather reads. ``unsharded()`` is the full weight the module computes with when FSDP has
    it gathered right now (edits must reach it too), else None.
    """

    shape: torch.Size
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
        raise RuntimeError(
            f"FSDP2 parameter in state {state}: reshard_after_forward=<int> is not supported by MacDrop"
        )


class FSDP1Shard(FSDPShard):
    """FSDP1 (``FullyShardedDataParallel``): the weight is parameter ``index`` of a FlatParameter
    (the concatenation of a wrapped module's flattened weights, padded); each rank holds a
    contiguous slice, ``_local_shard``, that each unshard reads (through ``_mp_shard`` under mixed
    precision, from the CPU under offload). ``_shard_param_infos`` says which part of the weight
    the slice holds. Under NO_SHARD (also FULL_SHARD on one rank: FSDP1 switches) the slice is the
    whole FlatParameter."""

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
                raise RuntimeError(f"FSDP1 shows {self.info.module_name}.{self.info.param_name} with shape "
                                   f"{tuple(view.shape)} in summon_full_params; expected {tuple(self.shape)}")
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


def bind_fsdp_shards(model: torch.nn.Module, targets: Sequence[RowTarget]) -> None:
    """Attach FSDP's storage to each target FSDP owns (call inside :func:`readable_weights`)."""
    for target in targets:
        shard = find_fsdp_shard(model, target.weight)
        if shard is not None:
            target.bind_shard(shard)
        elif uses_fsdp(model):
            raise RuntimeError(f"{target.name}: FSDP wraps the model but its storage of this weight was not found")


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
