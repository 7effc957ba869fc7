"""The model side of quantization: which weights, one saved copy each, every setting applied in
place from that copy and undone bit for bit (:class:`ModelQuantizer`, an
:class:`~..sweep.loop.InPlaceEdit`); the rule itself is :mod:`.rtn`."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ...core.architectures import FFNBlock, base_layer, find_ffn_blocks
from ...core.storage import bits as bit_view
from ..attack.attacks import SuperWeightTarget, check_super_weights
from .rtn import QuantizationError, QuantSetting, falls_back, rtn_quantize


# ----------------------------------------------------------------------------- the model side
def decoder_weights(model: nn.Module, blocks: Optional[Sequence[FFNBlock]] = None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every floating ``*weight`` with >= 2 dimensions inside the decoder layers.

    Adapter weights (LoRA/DoRA ``lora_*``) are not the model's and are skipped; a parameter shared
    by two layers is listed once.
    """
    blocks = blocks if blocks is not None else find_ffn_blocks(model)
    out, seen = [], set()
    for b in blocks:
        for name, p in b.layer.named_parameters():
            if not name.split(".")[-1].endswith("weight") or p.ndim < 2 or "lora_" in name or id(p) in seen:
                continue
            if not p.is_floating_point():
                raise QuantizationError(
                    f"{b.layer_prefix}{name} is stored as {p.dtype}: fake quantization needs a floating-point "
                    "checkpoint (load the unquantized model)"
                )
            seen.add(id(p))
            out.append((f"{b.layer_prefix}{name}", p))
    return out


@dataclass
class _Saved:
    name: str
    param: torch.Tensor
    original: torch.Tensor


class ModelQuantizer:
    """Applies :class:`QuantSetting` s in place from one saved copy of each weight; see the module doc.

    ``super_weights``: the weights ``protect`` = ``sw`` writes back; ``massive``: (layer, rows) or
    (layer, rows, expert) whose W_up/W_gate rows ``sw+massive`` also writes back (None: that
    protection is refused).
    """

    def __init__(
        self,
        model: nn.Module,
        super_weights: Sequence[SuperWeightTarget] = (),
        massive: Optional[tuple] = None,
        blocks: Optional[Sequence[FFNBlock]] = None,
    ) -> None:
        self.model = model
        self.blocks = list(blocks if blocks is not None else find_ffn_blocks(model))
        by_index = {b.index: b for b in self.blocks}
        self.saved = [_Saved(n, p, p.detach().clone()) for n, p in decoder_weights(model, self.blocks)]
        by_param = {id(s.param): s for s in self.saved}
        self.super_weights = list(super_weights)
        check_super_weights(by_index, self.super_weights)
        self._sw_entries = []  # (saved weight, index into it)
        for sw in self.super_weights:
            block = by_index[sw.layer]
            weight = base_layer(block.down).weight
            index = (sw.row, sw.col) if block.down_target([sw.col]).axis == 1 else (sw.col, sw.row)
            self._sw_entries.append((by_param[id(weight)], index))
        self.massive = None
        self._massive_rows = []  # (RowTarget, snapshot of its full-precision rows)
        if massive is not None:
            layer, rows, expert = massive[0], list(massive[1]), (massive[2] if len(massive) > 2 else None)
            if layer not in by_index:
                raise QuantizationError(f"massive layer {layer} is not a decoder layer of this model")
            self.massive = (layer, rows)
            targets = by_index[layer].row_targets(rows, expert=expert)
            self._massive_rows = [(t, t.snapshot()) for t in targets]

    # ------------------------------------------------------------------ facts
    @property
    def num_values(self) -> int:
        return sum(s.param.numel() for s in self.saved)

    def fallbacks(self, block_size: Optional[int]) -> int:
        """How many weights are quantized as one block at ``block_size``."""
        return sum(falls_back(s.param.numel(), block_size) for s in self.saved)

    def protected_values(self, protect: str) -> int:
        n = len(self._sw_entries) if protect in ("sw", "sw+massive") else 0
        if protect == "sw+massive":
            n += sum(snap.numel() for _, snap in self._massive_rows)
        return n

    # ------------------------------------------------------------------ applying
    def check(self, setting: QuantSetting) -> None:
        if setting.protect in ("sw", "sw+massive") and not self.super_weights:
            raise QuantizationError(f"--protect {setting.protect}: no super weight (give --super-weight LAYER,ROW,COL)")
        if setting.protect == "sw+massive" and self.massive is None:
            raise QuantizationError("--protect sw+massive: no massive rows were located for this model")

    @torch.no_grad()
    def quantize(self, setting: QuantSetting) -> None:
        """Write the setting's quantized weights (then the protected values) into the model."""
        self.check(setting)
        for s in self.saved:
            s.param.copy_(rtn_quantize(s.original, setting.bits, setting.block_size, setting.clip))
        if setting.protect in ("sw", "sw+massive"):
            for s, index in self._sw_entries:
                s.param[index] = s.original[index]
        if setting.protect == "sw+massive":
            for target, snap in self._massive_rows:
                target.restore(snap)

    @torch.no_grad()
    def restore(self) -> None:
        for s in self.saved:
            s.param.copy_(s.original)

    def changed(self) -> list[str]:
        """Names of the weights that differ from their saved copy (bitwise)."""
        return [s.name for s in self.saved if not torch.equal(bit_view(s.param.detach()), bit_view(s.original))]

    def verify_restored(self) -> None:
        changed = self.changed()
        if changed:
            raise RuntimeError(
                f"weights not restored bitwise after quantization: {changed[:5]}"
                + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            )

    @contextmanager
    def applied(self, setting: QuantSetting) -> Iterator[None]:
        """The model quantized per ``setting`` inside the block; restored (and checked) on exit."""
        if not setting.quantized:
            yield
            self.verify_restored()
            return
        try:
            self.quantize(setting)
            yield
        finally:
            self.restore()
        self.verify_restored()
