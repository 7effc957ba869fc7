"""bitsandbytes 4-bit weights (QLoRA): masking by editing the 4-bit codes.

Re-quantizing ``W * M`` would change the kept elements too. But NF4 and FP4 both have an exact
zero code, and a dequantized element is ``code_value * block_absmax``: setting the code of every
dropped element to the zero code, and leaving the kept elements' codes alone, gives exactly
Algorithm 1's effective weight ``dequant(W) * M``. Restoring writes the saved codes back.

Where the codes live (bitsandbytes 0.50), for element (n, k) of the [N, K] weight:

* canonical layout (what ``quantize_4bit`` produces, whatever ``quant_storage``: LLaMA-Factory
  stores the codes in a float tensor of the compute dtype, e.g. bf16 [N*K/4, 1], "crucial for
  fsdp+qlora"): flat index i = n*K + k, byte i // 2 of the storage viewed as uint8, high nibble
  when i is even;
* CPU layout (``_convert_weight_packed_for_cpu``, which ``Linear4bit.forward`` applies on CPUs
  with AVX512-BF16 to any eval-mode no-grad forward and never undoes; the flag is
  ``quant_state.packing_format_for_cpu``; the storage becomes uint8 [N, K/2]): with
  b = n mod 32, e = 2*b + (k mod 2), byte ``((n // 32) * K/2 + k // 2) * 32 + e mod 32``, high
  nibble when e >= 32.

The saved state is the selected elements' CODES (layout-free). Each apply/restore first checks
the layout (a flag and a data pointer: no dequantization) and re-derives its byte/nibble indices
when bitsandbytes has repacked the weight, so the codes are always written where the current
layout keeps them; nibbles of elements outside the selected rows are never changed.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from .base import RowTarget

logger = logging.getLogger("llamafactory_macdrop")

#: bitsandbytes' CPU layout groups rows in blocks of 32 (``block_n`` of its conversion)
CPU_BLOCK_N = 32


class Packed4bitRows(RowTarget):
    """Rows of a bitsandbytes ``Params4bit`` (plain ``Linear4bit`` rows: axis 0, no expert)."""

    backend = "bnb-4bit"

    def __init__(self, name, weight, rows, axis=0, expert=None) -> None:
        quant_state = weight.quant_state
        super().__init__(name, weight, rows, axis, expert, shape=torch.Size(quant_state.shape))
        if expert is not None or axis != 0:
            raise ValueError(f"{name}: 4-bit weights are supported for plain nn.Linear rows only")
        code = quant_state.code
        zeros = (code == 0).nonzero().flatten() if code is not None else torch.empty(0)
        if zeros.numel() == 0:
            raise ValueError(f"{name}: this 4-bit quantization has no exact zero code; cannot mask rows exactly")
        self.zero_code = int(zeros[0])
        self.quant_type = getattr(quant_state, "quant_type", "?")
        self._key = None
        self._warned = False
        self._sync()

    # ------------------------------------------------------------------ layout
    @property
    def layout(self) -> str:
        """``canonical`` or ``cpu`` (bitsandbytes' AVX512-BF16 repacking), as last seen."""
        return self._layout

    def describe(self) -> str:
        storage = getattr(self.weight, "quant_storage", self.weight.dtype)
        return f"{self.name} -> {self.backend} ({self.quant_type}, quant_storage {storage}, {self._layout} layout)"

    def _codes(self) -> torch.Tensor:
        """The packed codes as a flat uint8 view of the weight's storage (whatever its dtype)."""
        return self.weight.data.view(-1).view(torch.uint8)

    def _sync(self) -> None:
        """Re-derive the indices if bitsandbytes changed the layout or the storage since last time."""
        data = self.weight.data
        cpu = bool(getattr(self.weight.quant_state, "packing_format_for_cpu", False))
        key = (cpu, data.data_ptr(), data.device)
        if key == self._key:
            return
        n_rows, k = self.shape
        device = data.device
        n = self.rows.to(device)[:, None]
        col = torch.arange(k, device=device)[None, :]
        if cpu:
            if n_rows % CPU_BLOCK_N or k % 2:
                raise RuntimeError(
                    f"{self.name}: bitsandbytes' CPU layout with shape {tuple(self.shape)} is not understood"
                )
            e = 2 * (n % CPU_BLOCK_N) + col % 2
            byte = ((n // CPU_BLOCK_N) * (k // 2) + col // 2) * CPU_BLOCK_N + e % CPU_BLOCK_N
            shift = torch.where(e >= CPU_BLOCK_N, 4, 0)
        else:
            flat = n * k + col
            byte = flat // 2
            shift = torch.where(flat % 2 == 0, 4, 0)
        byte, shift = byte.flatten(), shift.flatten().to(torch.int32)
        self._byte, self._shift = byte, shift
        self._unique, self._inverse = torch.unique(byte, return_inverse=True)
        ours = torch.zeros(self._unique.numel(), dtype=torch.int32, device=device)
        ours.index_add_(0, self._inverse, 0xF << shift)  # the two nibbles of a byte never overlap
        self._others = (0xFF ^ ours).to(torch.uint8)  # bits of nibbles outside the selected rows
        if cpu and not self._warned:
            self._warned = True
            logger.warning(
                "%s: bitsandbytes repacked this 4-bit weight into its CPU inference layout (an eval/no-grad forward "
                "on an AVX512-BF16 CPU); MacDrop follows the new layout. Note that bitsandbytes then computes with "
                "bf16 block scales and passes no gradient through the layer's input (bitsandbytes 0.50.2), with or "
                "without MacDrop.",
                self.name,
            )
        self._layout = "cpu" if cpu else "canonical"
        self._key = key

    def _read_codes(self) -> torch.Tensor:
        codes = self._codes().index_select(0, self._byte).to(torch.int32)
        return ((codes >> self._shift) & 0xF).to(torch.uint8)

    def _write_codes(self, values: torch.Tensor) -> None:
        codes = self._codes()
        new = torch.zeros(self._unique.numel(), dtype=torch.int32, device=codes.device)
        new.index_add_(0, self._inverse, values.to(device=codes.device, dtype=torch.int32) << self._shift)
        kept = codes.index_select(0, self._unique) & self._others
        codes.index_copy_(0, self._unique, kept | new.to(torch.uint8))

    # ------------------------------------------------------------------ what RowDropout uses
    def snapshot(self) -> torch.Tensor:
        """The selected elements' 4-bit codes, (k, d) uint8: the same in every layout."""
        self._sync()
        return self._read_codes().view(self.mask_shape).clone()

    def apply_mask(self, snapshot: torch.Tensor, keep: torch.Tensor) -> None:
        self._sync()
        keep = keep.reshape(-1).to(snapshot.device)
        codes = torch.where(keep, snapshot.reshape(-1), torch.full_like(snapshot.reshape(-1), self.zero_code))
        self._write_codes(codes)

    def restore(self, snapshot: torch.Tensor) -> None:
        self._sync()
        self._write_codes(snapshot.reshape(-1))

    def matches(self, snapshot: torch.Tensor) -> bool:
        self._sync()
        return torch.equal(self._read_codes(), snapshot.reshape(-1).to(self._byte.device))

    def read(self) -> torch.Tensor:
        """The selected rows, dequantized (``code_value * block_absmax``; set-up and checks only).
        Bitwise bitsandbytes' ``dequantize_4bit`` in the canonical layout; in the CPU layout (which
        bitsandbytes can only compute with, not dequantize) the product of the code value and the
        bf16 scale rounded to bf16, within one bf16 rounding step of what its kernel uses."""
        self._sync()
        quant_state = self.weight.quant_state
        n_rows, k = self.shape
        codes = self._read_codes().view(self.mask_shape).long()
        values = quant_state.code.float().to(codes.device)[codes]
        absmax = quant_state.absmax
        n = self.rows.to(codes.device)[:, None]
        col = torch.arange(k, device=codes.device)[None, :]
        if self._layout == "cpu":  # bf16 [K / blocksize, N], transposed by the conversion
            scale = absmax[col // quant_state.blocksize, n]
        else:
            if getattr(quant_state, "nested", False):
                import bitsandbytes.functional as bnb_f

                absmax = bnb_f.dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
            scale = absmax.reshape(-1)[(n * k + col) // quant_state.blocksize]
        return (values * scale.float()).to(quant_state.dtype)


@contextmanager
def keep_canonical_4bit_layout(model: torch.nn.Module) -> Iterator[None]:
    """During a measurement forward (the locator's probe): stop bitsandbytes from repacking
    4-bit weights into its CPU layout, which it does for any eval-mode no-grad forward on an
    AVX512-BF16 CPU and never undoes. Without this the probe alone would change how every 4-bit
    layer computes for the rest of training (bf16 block scales, no gradient through the layer's
    input in bitsandbytes 0.50.2). Touches only ``Linear4bit``'s own switch."""
    switched = []
    for module in model.modules():
        flag = getattr(module, "support_avx512bf16_for_cpu", None)
        if flag and hasattr(module, "quant_state"):
            module.support_avx512bf16_for_cpu = False
            switched.append((module, flag))
    try:
        yield
    finally:
        for module, flag in switched:
            module.support_avx512bf16_for_cpu = flag
