"""The report of ``macdrop quantize`` and the sweep that fills it (THE loop over a :class:`~.quantizer.ModelQuantizer`)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ..sweep.loop import evaluate_settings
from ..sweep.report import SweepReport
from .quantizer import ModelQuantizer
from .rtn import RULE, QuantSetting


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
        from ..sweep.plots import plot_needle_heatmap
        from .plots import plot_quantization

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
