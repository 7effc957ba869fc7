"""Round-to-nearest fake quantization of the decoder weights, with super weights kept (Yu et al.).

Why: Yu et al. show that the super weight is the outlier that block-wise round-to-nearest (RTN)
quantization cannot afford to lose: clipping the outliers of a block gives the OTHER weights a
finer grid, and writing the super weight back afterwards keeps the model working. This module
measures that trade-off on a loaded model: every setting (bits x block size x clipping x
protection) is applied in place, evaluated, and undone bit for bit.

The rule (their ``quantize_blockwise``, min-max integer variant), per weight tensor:

1. Flatten row-major and split into blocks of ``B`` consecutive elements; when ``B`` does not
   divide the number of elements (or ``B`` is ``tensor``), the whole tensor is one block.
2. Optional clipping, before min/max: every value is clamped to ``[-t, t]`` with ``t`` per block:
   ``zscore:Z``  ``t = Z * std(|w|) + mean(|w|)`` (std with Bessel's correction, as torch's);
   ``block_pct:P`` / ``tensor_pct:P``  ``t`` = the k-th largest ``|w|`` of the block / of the
   whole tensor, ``k = max(1, round(n * P / 100))`` (P is a percentage of the n elements);
   ``iqr:F``  ``t = q3 + F * (q3 - q1)`` of ``|w|`` (quartiles with linear interpolation).
3. Asymmetric min-max: ``scale = (2^bits - 1) / (max - min)``,
   ``w := round((w - min) * scale) / scale + min`` (round half to even). A block whose max equals
   its min (all zeros, say) is left as it is (the formula would divide by zero).

The arithmetic runs in float32 (float64 for a float64 weight) and the result is cast back to the
weight's dtype. What is quantized: every floating ``*weight`` of two or more dimensions inside
the decoder layers (attention and FFN projections, MoE experts); embeddings, norms and the LM
head are not (their code quantizes ``*.weight`` under ``model.model`` except norms/embeddings).

Protection, after quantizing: ``sw`` writes the super weight(s) back in full precision;
``sw+massive`` (this project's extension) also the top-k massive rows of W_up/W_gate at the
massive layer, the rows that create the massive activation.

Speed and exactness: one copy of each quantized weight is saved when the quantizer is built;
each setting quantizes FROM that copy into the live parameter (no model copy per setting), and
undoing it copies the saved tensor back; after every setting each weight is compared with its
copy bit for bit. The copy lives on the weight's device (on a GPU: one extra set of decoder
weights in GPU memory, and the whole sweep runs there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ...core.values import comma_ints, comma_list
from ...errors import MacDropError

CLIP_METHODS = ("none", "zscore", "block_pct", "tensor_pct", "iqr")
PROTECTIONS = ("none", "sw", "sw+massive")
RULE = (
    "flatten row-major, blocks of B elements (whole tensor when B does not divide), optional clamp to [-t, t], "
    "scale = (2^bits - 1)/(max - min), w = round((w - min) * scale)/scale + min; max == min: unchanged"
)


class QuantizationError(MacDropError, ValueError):
    """A quantization setting that cannot be applied (reported like every other bad option)."""


# ----------------------------------------------------------------------------- the rule
@dataclass(frozen=True)
class ClipSpec:
    """How outliers are clamped before min/max: ``none``, ``zscore:Z``, ``block_pct:P``,
    ``tensor_pct:P`` or ``iqr:F``."""

    method: str = "none"
    value: Optional[float] = None

    @property
    def label(self) -> str:
        return self.method if self.method == "none" else f"{self.method}:{self.value:g}"

    def __str__(self) -> str:
        return self.label


def parse_clip(text: str) -> ClipSpec:
    """``none`` | ``zscore:Z`` (Z > 0) | ``block_pct:P`` / ``tensor_pct:P`` (0 < P < 100) | ``iqr:F`` (F >= 0)."""
    method, _, value = text.strip().partition(":")
    allowed = "none, zscore:Z, block_pct:P, tensor_pct:P, iqr:F"
    if method not in CLIP_METHODS:
        raise QuantizationError(f"--clip {text!r} is not allowed: choose from {allowed}")
    if method == "none":
        if value:
            raise QuantizationError(f"--clip {text!r}: 'none' takes no value")
        return ClipSpec()
    try:
        number = float(value)
    except ValueError:
        example = {"zscore": "3", "iqr": "1.5"}.get(method, "0.1")
        raise QuantizationError(f"--clip {text!r}: {method} needs a number, e.g. {method}:{example}") from None
    ok = {"zscore": number > 0, "iqr": number >= 0}.get(method, 0 < number < 100)
    if not ok or not math.isfinite(number):
        rng = {"zscore": "Z > 0", "iqr": "F >= 0"}.get(method, "0 < P < 100 (a percentage)")
        raise QuantizationError(f"--clip {text!r} is not allowed: {method} needs {rng}")
    return ClipSpec(method, number)


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile with linear interpolation (torch.quantile's default), by sorting: no size limit."""
    s = x.sort(dim=1).values
    pos = q * (s.shape[1] - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[:, lo : lo + 1] + (pos - lo) * (s[:, hi : hi + 1] - s[:, lo : lo + 1])


def _clip_threshold(blocks: torch.Tensor, clip: ClipSpec) -> torch.Tensor:
    """t per block ([n_blocks, 1]); see the module rule."""
    mag = blocks.abs()
    if clip.method == "zscore":
        return clip.value * mag.std(dim=1, keepdim=True) + mag.mean(dim=1, keepdim=True)
    if clip.method == "iqr":
        q1, q3 = _quantile(mag, 0.25), _quantile(mag, 0.75)
        return q3 + clip.value * (q3 - q1)
    flat = mag if clip.method == "block_pct" else mag.reshape(1, -1)
    k = max(1, round(flat.shape[1] * clip.value / 100))
    t = flat.topk(k, dim=1).values[:, -1:]
    return t if clip.method == "block_pct" else t.expand(blocks.shape[0], 1)


def rtn_quantize(
    weight: torch.Tensor, bits: int, block_size: Optional[int], clip: ClipSpec = ClipSpec()
) -> torch.Tensor:
    """The fake-quantized copy of ``weight`` (same shape and dtype); ``block_size`` None = whole tensor."""
    if bits < 1:
        raise QuantizationError(f"--bits {bits} is not allowed: give 1..16")
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    flat = weight.detach().reshape(-1).to(compute, copy=True)
    n = flat.numel()
    blocks = flat.view(-1, block_size) if block_size and n % block_size == 0 else flat.view(1, -1)
    if clip.method != "none":
        t = _clip_threshold(blocks, clip)
        blocks = torch.minimum(torch.maximum(blocks, -t), t)
    lo = blocks.amin(dim=1, keepdim=True)
    hi = blocks.amax(dim=1, keepdim=True)
    span = hi - lo
    flat_span = span > 0
    levels = torch.full_like(span, 2**bits - 1)  # a true division (int / tensor is levels * (1/span) in torch)
    scale = levels / torch.where(flat_span, span, torch.ones_like(span))
    q = torch.round((blocks - lo) * scale) / scale + lo
    q = torch.where(flat_span, q, blocks)
    return q.reshape(weight.shape).to(weight.dtype)


def falls_back(numel: int, block_size: Optional[int]) -> bool:
    """Whether a tensor of ``numel`` elements is quantized as one block at this block size."""
    return block_size is None or numel % block_size != 0


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class QuantSetting:
    """One row of a sweep; ``bits`` None is the unquantized model."""

    bits: Optional[int] = None
    block_size: Optional[int] = None  # None: the whole tensor ("tensor")
    clip: ClipSpec = ClipSpec()
    protect: str = "none"

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def block_label(self) -> str:
        return "tensor" if self.block_size is None else str(self.block_size)

    @property
    def label(self) -> str:
        if not self.quantized:
            return "unquantized"
        return f"{self.bits}-bit block {self.block_label}, clip {self.clip.label}, protect {self.protect}"

    def to_dict(self) -> dict[str, Any]:
        if not self.quantized:
            return {"bits": None, "block_size": None, "protect": None, "clip": None}
        return {
            "bits": self.bits,
            "block_size": "tensor" if self.block_size is None else self.block_size,
            "protect": self.protect,
            "clip": self.clip.label,
        }


def parse_block_sizes(text: str) -> list[Optional[int]]:
    """``128,4096,tensor`` -> [128, 4096, None]."""
    out = []
    for part in comma_list(text):
        if part == "tensor":
            out.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            value = 0
        if value < 2:
            raise QuantizationError(f"--block-size {part!r} is not allowed: give integers >= 2 or 'tensor'")
        out.append(value)
    if not out:
        raise QuantizationError("--block-size is empty: give e.g. 128,4096,tensor")
    return list(dict.fromkeys(out))


def parse_bits(text: str) -> list[int]:
    try:
        values = comma_ints(text)
    except ValueError:
        values = [0]
    if not values or any(not 1 <= b <= 16 for b in values):
        raise QuantizationError(f"--bits {text!r} is not allowed: give comma-separated integers in 1..16, e.g. 8,6,4")
    return list(dict.fromkeys(values))


def parse_protect(text: str) -> list[str]:
    values = comma_list(text)
    bad = [p for p in values if p not in PROTECTIONS]
    if bad or not values:
        raise QuantizationError(
            f"--protect {text!r} is not allowed: choose from {', '.join(PROTECTIONS)} (comma-separated)"
        )
    return list(dict.fromkeys(values))


def quant_settings(
    bits: Sequence[int],
    block_sizes: Sequence[Optional[int]],
    clips: Sequence[ClipSpec] = (ClipSpec(),),
    protects: Sequence[str] = ("none",),
) -> list[QuantSetting]:
    """The unquantized baseline, then every bits x block size x clip x protection."""
    settings = [QuantSetting()]
    for b in bits:
        for bs in block_sizes:
            for c in clips:
                settings += [QuantSetting(b, bs, c, p) for p in protects]
    return settings
