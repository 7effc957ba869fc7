"""Where the rows MacDrop drops are stored, one small backend per kind of storage.

Masking a row means editing, in place, the numbers a layer computes with. How those numbers are
stored depends on the set-up, and each storage gets its own class behind one interface
(:class:`~.base.RowTarget`):

===================  =====================================================================
backend              storage
===================  =====================================================================
``dense``            a plain (replicated) floating-point tensor
``zero3-partition``  a DeepSpeed ZeRO-3 parameter: this rank's flat partition
``fsdp1-shard``      FSDP1: this rank's slice of a FlatParameter
``fsdp2-shard``      FSDP2: this rank's dim-0 shard of a DTensor
``bnb-4bit``         a bitsandbytes ``Params4bit`` (QLoRA): 4-bit codes, in bitsandbytes'
                     canonical layout (any ``quant_storage`` dtype) or its CPU layout
===================  =====================================================================

:func:`row_target` is the one factory: it looks at the weight (its type, not its dtype), picks
the backend, and refuses with :class:`UnsupportedStorageError` (one line) any storage no backend
claims, so a new kind of storage can never fall silently into the dense path.
"""

from .base import RowTarget, bits, logical_shape
from .bnb4bit import Packed4bitRows, keep_canonical_4bit_layout
from .dense import DenseRows
from .factory import (
    UnsupportedStorageError,
    is_packed_4bit,
    is_zero3_partitioned,
    row_target,
)
from .fsdp import (
    FSDP1Shard,
    FSDP1ShardRows,
    FSDP2Shard,
    FSDP2ShardRows,
    FSDPShard,
    find_fsdp_shard,
    readable_weights,
    uses_fsdp,
)
from .zero3 import Zero3PartitionRows

__all__ = [
    "RowTarget",
    "bits",
    "logical_shape",
    "row_target",
    "UnsupportedStorageError",
    "is_packed_4bit",
    "is_zero3_partitioned",
    "DenseRows",
    "Zero3PartitionRows",
    "FSDP1ShardRows",
    "FSDP2ShardRows",
    "Packed4bitRows",
    "FSDPShard",
    "FSDP1Shard",
    "FSDP2Shard",
    "find_fsdp_shard",
    "readable_weights",
    "uses_fsdp",
    "keep_canonical_4bit_layout",
]
