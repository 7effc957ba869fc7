"""The one place that decides which backend edits a weight, or refuses it."""

from __future__ import annotations

import sys
from typing import Optional

import torch

from ...errors import MacDropError
from .base import RowTarget
from .bnb4bit import Packed4bitRows
from .dense import DenseRows
from .fsdp import FSDP1ShardRows, FSDP2ShardRows, FSDPShard, find_fsdp_shard, uses_fsdp
from .zero3 import Zero3PartitionRows

SUPPORTED = (
    "dense float tensors, DeepSpeed ZeRO-3 partitions, FSDP1/FSDP2 shards, bitsandbytes 4-bit (quantization_bit: 4)"
)


class UnsupportedStorageError(MacDropError, ValueError):
    """A weight MacDrop would have to mask is stored in a way no backend handles exactly."""


def _refuse(name: str, what: str) -> UnsupportedStorageError:
    return UnsupportedStorageError(f"{name}: MacDrop cannot mask {what} exactly (supported: {SUPPORTED})")


def _bnb_type(weight: torch.Tensor, name: str) -> Optional[str]:
    """'4bit' for a bitsandbytes Params4bit, None for a non-bitsandbytes tensor; refuses other
    bitsandbytes parameters (Int8Params: LLM.int8, quantization_bit: 8)."""
    if not type(weight).__module__.startswith("bitsandbytes"):
        return None
    nn = sys.modules["bitsandbytes"].nn  # loaded: the weight is one of its types
    if isinstance(weight, nn.Params4bit):
        return "4bit"
    if isinstance(weight, getattr(nn, "Int8Params", ())):
        raise _refuse(name, "bitsandbytes 8-bit weights (Int8Params, quantization_bit: 8)")
    raise _refuse(name, f"a bitsandbytes {type(weight).__name__}")


def is_packed_4bit(weight: torch.Tensor) -> bool:
    """A bitsandbytes ``Params4bit`` after quantization (QLoRA's frozen base weight), whatever
    the dtype of the storage its codes live in (LLaMA-Factory uses the compute dtype)."""
    try:
        kind = _bnb_type(weight, "")
    except UnsupportedStorageError:
        return False
    return kind == "4bit" and getattr(weight, "quant_state", None) is not None


def is_zero3_partitioned(weight: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 owns this parameter (its values live in per-rank partitions)."""
    return getattr(weight, "ds_tensor", None) is not None and hasattr(weight, "ds_numel")


def row_target(
    name: str,
    weight: Optional[torch.Tensor],
    rows,
    axis: int = 0,
    expert: Optional[int] = None,
    *,
    module: Optional[torch.nn.Module] = None,
    model: Optional[torch.nn.Module] = None,
    shard: Optional[FSDPShard] = None,
) -> RowTarget:
    """The backend for rows ``rows`` of ``weight`` (the parameter ``module`` computes with).

    ``model``: the model as the trainer runs it; when FSDP wraps it, the weight's FSDP storage
    is looked up there (call inside :func:`~.fsdp.readable_weights`). ``shard``: that storage,
    when already known. The chosen backend is ``target.backend`` (``target.describe()`` for the
    log); anything no backend claims raises :class:`UnsupportedStorageError`, one line.
    """
    if weight is None:
        owner = type(module).__name__ if module is not None else "the module"
        packed = " (it stores 'qweight': a pre-quantized GPTQ/AWQ-style layer)" if hasattr(module, "qweight") else ""
        raise _refuse(name, f"{owner}, which has no 'weight'{packed}")
    if shard is None and model is not None and uses_fsdp(model):
        shard = find_fsdp_shard(model, weight)
        if shard is None:
            raise _refuse(name, "this weight: FSDP wraps the model but its storage of this weight was not found")
    bnb = _bnb_type(weight, name)
    if bnb == "4bit":
        if shard is not None or is_zero3_partitioned(weight):
            raise _refuse(name, "a bitsandbytes 4-bit weight that FSDP or ZeRO-3 partitions")
        if getattr(weight, "quant_state", None) is None or not getattr(weight, "bnb_quantized", True):
            raise _refuse(name, "a bitsandbytes 4-bit weight that is not quantized yet")
        return Packed4bitRows(name, weight, rows, axis, expert)
    if getattr(weight, "quant_state", None) is not None:
        raise _refuse(name, f"a {type(weight).__name__} carrying a quant_state (quantized storage of unknown layout)")
    if shard is not None:
        if is_zero3_partitioned(weight):
            raise _refuse(name, "a weight that is both ZeRO-3 partitioned and FSDP sharded")
        cls = {1: FSDP1ShardRows, 2: FSDP2ShardRows}.get(getattr(shard, "version", None))
        if cls is None:
            raise _refuse(name, f"FSDP storage {type(shard).__name__} (version {getattr(shard, 'version', None)})")
        return cls(name, weight, rows, axis, expert, shard=shard)
    if is_zero3_partitioned(weight):
        if not weight.ds_tensor.is_floating_point():
            raise _refuse(name, f"a ZeRO-3 partition of dtype {weight.ds_tensor.dtype}")
        return Zero3PartitionRows(name, weight, rows, axis, expert)
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        hint = (
            " (an FSDP2 DTensor: build the targets with the model, inside readable_weights)"
            if type(weight).__name__ == "DTensor"
            else ""
        )
        raise _refuse(name, f"a weight of tensor type {type(weight).__module__}.{type(weight).__name__}{hint}")
    if not weight.is_floating_point():
        raise _refuse(name, f"a weight of dtype {weight.dtype} (quantized integer storage)")
    return DenseRows(name, weight, rows, axis, expert)
