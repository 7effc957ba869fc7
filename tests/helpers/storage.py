"""Every weight storage MacDrop edits, laid out by hand as the real systems leave it, with what a
layer would compute with (gathered, dequantized) read back from OUTSIDE the backend.

Used by tests/core/test_masking.py (backend-specific checks) and tests/core/test_storage_contract.py
(the rules every backend must keep). Nothing here calls a backend's own read/matches for the checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from llamafactory_macdrop.core.masking import RowDropout
from llamafactory_macdrop.core.storage import FSDPShard, bits, row_target


# ----------------------------------------------------------------------------- ZeRO-3 partitions
def partitioned(full: torch.Tensor, world: int, rank: int) -> torch.nn.Parameter:
    """A parameter laid out like DeepSpeed ZeRO-3 leaves it between forwards on ``rank``."""
    flat = full.reshape(-1)
    size = -(-flat.numel() // world)  # ceil: the last partition is padded
    padded = torch.cat([flat, torch.full((size * world - flat.numel(),), float("nan"))])
    p = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    p.ds_tensor = padded[rank * size : (rank + 1) * size].clone()
    p.ds_tensor.ds_numel = size
    p.ds_numel, p.ds_shape, p.ds_process_group = flat.numel(), full.shape, f"rank{rank}"
    return p


# ----------------------------------------------------------------------------- FSDP shards
class Shard(FSDPShard):
    """This rank's FSDP storage, laid out by hand: ``storage[base + i]`` = flat element ``start + i``."""

    def __init__(self, shape, storage, start, count, base, version):
        self.shape, self.storage, self.start, self.count, self.base = shape, storage, start, count, base
        self.version = version  # 1: FSDP1's FlatParameter slice, 2: FSDP2's dim-0 shard
        self.gathered = None  # the full weight while FSDP holds it gathered

    def local(self):
        return self.storage

    def unsharded(self):
        return self.gathered


def fsdp2_shards(full, world):
    """dim-0 chunks of c = ceil(n0 / world) rows (torch.chunk), each zero-padded to c rows (NaN here)."""
    c = -(-full.shape[0] // world)
    row = full[0].numel()
    shards = []
    for r in range(world):
        rows = full[r * c : (r + 1) * c].reshape(-1)
        padded = torch.cat([rows, torch.full((c * row - rows.numel(),), float("nan"))])
        shards.append(Shard(full.shape, padded, r * c * row, rows.numel(), 0, version=2))
    return shards, lambda: torch.cat([sh.storage[: sh.count] for sh in shards]).view(full.shape)


def fsdp1_shards(full, world, before=10):
    """One FlatParameter = [another weight (``before`` numbers), W flattened, padding], split in
    ``world`` contiguous slices; each rank's slice holds part of W at some offset."""
    flat = torch.cat([torch.randn(before), full.reshape(-1)])
    size = -(-flat.numel() // world)
    flat = torch.cat([flat, torch.full((size * world - flat.numel(),), float("nan"))])
    shards = []
    for r in range(world):
        lo, hi = max(r * size, before), min((r + 1) * size, before + full.numel())
        storage = flat[r * size : (r + 1) * size].clone()
        shards.append(Shard(full.shape, storage, lo - before, max(0, hi - lo), max(0, lo - r * size), version=1))
    return shards, lambda: torch.cat([sh.storage for sh in shards])[before : before + full.numel()].view(full.shape)


# ----------------------------------------------------------------------------- 4-bit (QLoRA)
def linear4bit(quant_storage, quant_type="nf4", out=128, inp=64, seed=0, nested=True):
    """A bitsandbytes Linear4bit quantized by bitsandbytes itself, with the given ``quant_storage``
    (LLaMA-Factory passes its compute dtype: bf16, or fp32 on a CPU without bf16)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        inp,
        out,
        bias=False,
        quant_type=quant_type,
        compute_dtype=torch.float32,
        compress_statistics=nested,
        quant_storage=quant_storage,
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out, inp),
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=nested,
        quant_storage=quant_storage,
        module=layer,
    )
    return layer.to("cpu")


def effective(layer):
    """The weight the layer computes with: its own forward on the identity (train mode, so
    bitsandbytes does not repack it), as float32 [out, in]."""
    with torch.no_grad():
        return type(layer).forward(layer, torch.eye(layer.in_features)).T.float().clone()


def storage_bytes(weight):
    return weight.data.view(-1).view(torch.uint8).clone()


# ----------------------------------------------------------------------------- one case per backend
@dataclass
class StorageCase:
    """One storage of one weight, on every rank that holds a piece of it.

    ``drops``: one RowDropout per rank (the same rows); ``matrix()``: the whole logical matrix
    (the chosen expert of a 3-D weight) as the layer computes with it, assembled from outside;
    ``raw()``: every rank's stored bytes; ``versions()``: the autograd version counters of the
    tensors the layer reads; ``rows``/``axis``: which units of ``matrix()`` are edited."""

    backend: str
    drops: list
    matrix: Callable[[], torch.Tensor]
    raw: Callable[[], list]
    versions: Callable[[], tuple]
    rows: list
    axis: int = 0
    expert: Optional[int] = None


ROWS = [22, 3, 9]


def _dense(axis=0, expert=None) -> StorageCase:
    torch.manual_seed(0)
    shape = (4, 23, 13) if expert is not None else ((13, 23) if axis == 1 else (23, 13))
    w = torch.nn.Parameter(torch.randn(*shape), requires_grad=False)
    w.data.view(-1)[0] = -0.0
    drop = RowDropout([row_target("w", w, ROWS, axis=axis, expert=expert)])
    pick = (lambda: w.detach()[expert]) if expert is not None else (lambda: w.detach())
    return StorageCase(
        "dense",
        [drop],
        lambda: pick().clone(),
        lambda: [bits(w.detach()).clone()],
        lambda: (w._version,),
        ROWS,
        axis,
        expert,
    )


def _zero3(monkeypatch) -> StorageCase:
    deepspeed_comm = pytest.importorskip("deepspeed.comm")
    monkeypatch.setattr(deepspeed_comm, "get_rank", lambda group=None: int(group[4:]))
    torch.manual_seed(0)
    full = torch.randn(23, 13)
    params = [partitioned(full, 3, r) for r in range(3)]
    drops = []
    for p in params:  # set-up reads the rows once from the gathered weight (GatheredParameters)
        p.data = full.clone()
        drops.append(RowDropout([row_target("w", p, ROWS)]))
        p.data = torch.empty(0)
    gathered = lambda: torch.cat([p.ds_tensor for p in params])[: full.numel()].view(full.shape).clone()  # noqa: E731
    return StorageCase(
        "zero3-partition",
        drops,
        gathered,
        lambda: [bits(p.ds_tensor).clone() for p in params],
        lambda: tuple(v for p in params for v in (p._version, p.ds_tensor._version)),
        ROWS,
    )


def _fsdp(version: int) -> StorageCase:
    torch.manual_seed(0)
    full = torch.randn(23, 13)
    shards, gather = (fsdp2_shards if version == 2 else fsdp1_shards)(full, 3)
    drops = []
    for shard in shards:
        shard.gathered = full.clone()
        drops.append(RowDropout([row_target("w", full.clone(), ROWS, shard=shard)]))
        shard.gathered = None
    return StorageCase(
        f"fsdp{version}-shard",
        drops,
        lambda: gather().clone(),
        lambda: [bits(sh.storage).clone() for sh in shards],
        lambda: tuple(sh.storage._version for sh in shards),
        ROWS,
    )


def _bnb4bit(quant_storage) -> StorageCase:
    layer = linear4bit(quant_storage)
    drop = RowDropout([row_target("w", layer.weight, ROWS)])
    return StorageCase(
        "bnb-4bit",
        [drop],
        lambda: effective(layer),
        lambda: [storage_bytes(layer.weight)],
        lambda: (layer.weight._version, layer.weight.data._version),
        ROWS,
    )


#: every backend (and the layouts a backend must handle), by test id
CASES: dict[str, Callable] = {
    "dense": lambda mp: _dense(),
    "dense-conv1d": lambda mp: _dense(axis=1),
    "dense-moe-expert": lambda mp: _dense(expert=2),
    "zero3-partition": _zero3,
    "fsdp1-shard": lambda mp: _fsdp(1),
    "fsdp2-shard": lambda mp: _fsdp(2),
    "bnb-4bit-fp32-storage": lambda mp: _bnb4bit(torch.float32),
    "bnb-4bit-bf16-storage": lambda mp: _bnb4bit(torch.bfloat16),
    "bnb-4bit-uint8-storage": lambda mp: _bnb4bit(torch.uint8),
}
