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
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ...core.architectures import FFNBlock, base_layer, find_ffn_blocks
from ...core.masking import bits as bit_view
from ...errors import MacDropError
from .attacks import SuperWeightTarget, check_super_weights
from .sweep import SweepReport, evaluate_settings

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
    for part in (p.strip() for p in text.split(",") if p.strip()):
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
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = [0]
    if not values or any(not 1 <= b <= 16 for b in values):
        raise QuantizationError(f"--bits {text!r} is not allowed: give comma-separated integers in 1..16, e.g. 8,6,4")
    return list(dict.fromkeys(values))


def parse_protect(text: str) -> list[str]:
    values = [p.strip() for p in text.split(",") if p.strip()]
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


# ----------------------------------------------------------------------------- the sweep
@dataclass
class QuantizationReport(SweepReport):
    """Rows of a quantization sweep (``results``) and what was quantized, kept and measured."""

    schema = "macdrop.quantize/1"

    model: str
    dtype: str
    weights: dict[str, Any]
    super_weights: list[dict[str, Any]] = field(default_factory=list)
    massive: Optional[dict[str, Any]] = None

    def payload(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "rule": RULE,
            "weights": self.weights,
            "super_weights": self.super_weights,
            "massive": self.massive,
            "perplexity_protocol": self.perplexity_protocol,
            "probe_prefix": self.probe_prefix,
            "zeroshot": self.zeroshot_dict(),
            "restored_bitwise": self.restored_bitwise,
            "results": self.rows,
            **({"generation": self.gen_rows, "generation_protocol": self.gen_protocol} if self.gen_rows else {}),
        }

    @staticmethod
    def key(row: dict[str, Any]) -> tuple:
        return (row["bits"], row["block_size"], row["clip"], row["protect"])

    def setting_label(self, key: tuple) -> str:
        bits, block, clip, protect = key
        if bits is None:
            return f"{self.dtype} (unquantized)"
        return f"{bits}-bit block {block if block is not None else 'tensor'}, clip {clip}, protect {protect}"

    def plot(self, folder: str | Path) -> list[Path]:
        """quantize.png (metric vs block size) and needle_heatmap.png where the report has what they draw."""
        from .plots import plot_needle_heatmap, plot_quantization

        folder, out = Path(folder), []
        if self.rows:
            out.append(plot_quantization(self, folder / "quantize.png"))
        if any("length" in r for r in self.gen_rows):
            label = lambda r: self.setting_label(self.key(r))  # noqa: E731
            out.append(plot_needle_heatmap(self, folder / "needle_heatmap.png", label))
        return out

    def results_table(self) -> str:
        """Markdown: one line per setting, perplexity per corpus and accuracy (%) per task."""
        head = self.metric_head()
        lines = self.input_lines()
        lines += [
            "| bits | block | clip | protect | " + " | ".join(head) + " |",
            "|---:|---:|---|---|" + "---:|" * len(head),
        ]
        for key in self.keys():
            b, bs, c, p = key
            cells = [f"{self.dtype} (unquantized)", "-", "-", "-"] if b is None else [str(b), str(bs), c, p]
            lines.append("| " + " | ".join(cells + self.metric_cells(key, _ppl_text)) + " |")
        return "\n".join(lines)


def _ppl_text(v: float) -> str:
    return f"{v:.2f}" if v < 1e5 else f"{v:.3g}"


def run_quantization_sweep(
    quantizer: ModelQuantizer,
    settings: Sequence[QuantSetting],
    corpora: Sequence[Any] = (),
    zeroshot=None,
    *,
    report: QuantizationReport,
    batch_size: int = 1,
    progress: bool = True,
    echo=None,
    generation=None,
    checkpoint=None,
) -> QuantizationReport:
    """Evaluate every setting on every corpus (:class:`~.sweep.PreparedCorpus`) and zero-shot task.

    ``echo`` (e.g. ``print``) gets one line per measurement, numbered by setting, so a long sweep
    shows where it is; every setting is undone and checked bit for bit before the next;
    ``checkpoint`` keeps every finished setting (:class:`~.checkpoint.SweepCheckpoint`).
    """
    for s in settings:
        quantizer.check(s)
    report.record_inputs(corpora, zeroshot)
    numbered = {id(s): i for i, s in enumerate(settings, 1)}
    started: dict[int, float] = {}

    class Timed:
        """The quantizer, timing how long each setting takes to write (the report's quantized-in)."""

        @staticmethod
        @contextmanager
        def applied(setting: QuantSetting) -> Iterator[None]:
            start = time.perf_counter()
            with quantizer.applied(setting):
                started[id(setting)] = time.perf_counter() - start
                yield

        verify_restored = staticmethod(quantizer.verify_restored)

    def tag(setting: QuantSetting) -> str:
        return f"[{numbered[id(setting)]}/{len(settings)}] {setting.label}"

    if generation is not None:
        report.gen_protocol = generation.protocol()

    def record(setting: QuantSetting, dataset: str, res) -> None:
        if hasattr(res, "items") and hasattr(res, "metrics"):  # a generation task
            report.record_generation(setting.to_dict(), res)
            if echo:
                shown = ", ".join(f"{m} {a['mean']:.3f}" for m, a in res.metrics.items())
                echo(f"  {tag(setting):<58} {dataset:<14} {shown}  ({res.new_tokens} tokens, {res.seconds:.1f} s)")
            return
        extra: dict[str, Any] = {}
        if setting.quantized:
            extra = {
                "tensor_fallback": quantizer.fallbacks(setting.block_size),
                "protected_values": quantizer.protected_values(setting.protect),
            }
        if hasattr(res, "ppl"):
            report.rows.append(
                {
                    **setting.to_dict(),
                    "dataset": dataset,
                    "ppl": res.ppl,
                    "nll": res.nll,
                    "tokens": res.tokens,
                    **extra,
                    "seconds": round(res.seconds, 3),
                }
            )
            if echo:
                echo(
                    f"  {tag(setting):<58} {dataset:<14} ppl {_ppl_text(res.ppl):>10}  "
                    f"(quantized in {started[id(setting)]:.1f} s, evaluated in {res.seconds:.1f} s)"
                )
        else:
            report.rows.append(
                {
                    **setting.to_dict(),
                    "dataset": dataset,
                    "acc": res.acc,
                    "acc_norm": res.acc_norm,
                    "n": res.n,
                    "split": res.split,
                    **extra,
                }
            )
            if echo:
                echo(f"  {tag(setting):<58} {dataset:<14} acc {100 * res.acc:6.1f}  (n={res.n}, {res.split})")

    evaluate_settings(
        quantizer.model,
        Timed(),
        settings,
        corpora,
        zeroshot,
        on_result=record,
        label=tag,
        batch_size=batch_size,
        progress=progress,
        generation=generation,
        echo=echo if progress else None,
        resumed=(lambda s: checkpoint.restore(report, report.key(s.to_dict()), s.label))
        if checkpoint is not None
        else (lambda s: False),
        finished=(lambda s: checkpoint.save(report, report.key(s.to_dict())))
        if checkpoint is not None
        else (lambda s: None),
    )
    report.restored_bitwise = True
    return report
