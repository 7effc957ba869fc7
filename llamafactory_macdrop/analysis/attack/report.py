"""The report of ``macdrop attack`` and the sweep that fills it: one row per setting x corpus/task.

:func:`run_sweep` runs THE loop (:func:`~..sweep.loop.evaluate_settings`) over a
:class:`~.attacks.ModelAttacker` and appends rows to an :class:`AttackReport` as they come in;
:func:`loss_gap_recovery` is the super-activation experiment's summary (Yu et al.).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from ..sweep.loop import PreparedCorpus, evaluate_settings
from ..sweep.report import SweepReport
from .attacks import AttackSetting, ModelAttacker


@dataclass
class AttackReport(SweepReport):
    """Rows of an attack sweep and how they were measured."""

    schema = "macdrop.attack/1"

    model: str
    adapter: Optional[str]
    targets: dict[str, Any]
    generations: list[dict[str, Any]] = field(default_factory=list)  # --generate: analysis/attack/generation.py
    generate_protocol: Optional[dict[str, Any]] = None  # how they were generated
    recovery: list[dict[str, Any]] = field(default_factory=list)  # sw_restore: see loss_gap_recovery
    restored_when = "after the sweep"

    def payload(self) -> dict[str, Any]:
        extra = (
            {"generate_protocol": self.generate_protocol, "generations": self.generations}
            if self.generate_protocol
            else {}
        )
        if self.gen_rows:
            extra["generation"] = self.gen_rows
            extra["generation_protocol"] = self.gen_protocol
        if self.recovery:
            extra["sw_restore_recovery"] = self.recovery
        if self.probe_prefix is not None:
            extra["probe_prefix"] = self.probe_prefix
        return {
            **{
                "model": self.model,
                "adapter": self.adapter,
                "targets": self.targets,
                "perplexity_protocol": self.perplexity_protocol,
                "zeroshot": self.zeroshot_dict(),
                "restored_bitwise": self.restored_bitwise,
                "results": self.rows,
            },
            **extra,
        }

    @staticmethod
    def key(row: dict[str, Any]) -> str:
        return row["setting"]

    def settings(self) -> list[tuple[str, int, str]]:
        """(mode, k, label) of every setting, in the order they were run (labels are unique)."""
        seen = {}
        for r in self.rows:
            seen.setdefault(r["setting"], (r["mode"], r["k"]))
        return [(mode, k, label) for label, (mode, k) in seen.items()]

    def extra_tables(self) -> list[str]:
        return [recovery_table(self.recovery)] if self.recovery else []

    def closing_blocks(self) -> list[str]:
        if not self.generate_protocol:
            return []
        from .generation import Generation, generations_table

        return [generations_table([Generation(**g) for g in self.generations])]

    def write_generate_report(self, path: str | Path) -> Path:
        """``--generate-report``: the greedy texts side by side (.md, or .html/.htm)."""
        from .generation import Generation, write_generation_report

        title = f"{self.model}{' + adapter ' + self.adapter if self.adapter else ''}: greedy generation under attack"
        gens = [Generation(**g) for g in self.generations]
        return write_generation_report(path, gens, self.generate_protocol["prompt"], title)

    def plot(self, folder: str | Path) -> list[Path]:
        """attack_sweep.png (metric vs k), superweight_scaling.png (several scales), generation_sweep.png
        and needle_heatmap.png where the report has what they draw."""
        from ..sweep.plots import plot_generation_sweep, plot_needle_heatmap
        from .plots import plot_attack_sweep, plot_superweight_scaling

        folder, out = Path(folder), []
        if self.rows:
            out.append(plot_attack_sweep(self, folder / "attack_sweep.png"))
            if sum(mode == "superweight" for mode, _, _ in self.settings()) > 1:
                out.append(plot_superweight_scaling(self, folder / "superweight_scaling.png"))
        if self.gen_rows:
            out.append(plot_generation_sweep(self, folder / "generation_sweep.png"))
            if any("length" in r for r in self.gen_rows):
                out.append(plot_needle_heatmap(self, folder / "needle_heatmap.png"))
        return out

    def results_table(self) -> str:
        """Markdown: one line per setting, perplexity per corpus, accuracy (%) per task and mean."""
        tasks = [d for d, m in self.columns() if m == "acc"]
        head = self.metric_head() + (["mean acc"] if len(tasks) > 1 else [])
        lines = self.input_lines()
        lines += ["| setting | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        for label in self.keys():
            cells = self.metric_cells(label)
            if len(tasks) > 1:
                accs = [self.value(label, d, "acc") for d in tasks]
                accs = [a for a in accs if a is not None]
                cells.append(f"{100 * sum(accs) / len(accs):.1f}" if len(accs) == len(tasks) else "-")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _row(setting: AttackSetting, dataset: str, **values: Any) -> dict[str, Any]:
    row = {"mode": setting.mode, "k": setting.k, "setting": setting.label, "dataset": dataset}
    if setting.scale is not None:
        row["scale"] = setting.scale
    if setting.fill is not None:
        row["fill"] = setting.fill
    row.update(values)
    return row


def run_sweep(
    model: nn.Module,
    attacker: ModelAttacker,
    settings: Sequence[AttackSetting],
    corpora: Sequence[PreparedCorpus] = (),
    zeroshot=None,
    *,
    report: AttackReport,
    batch_size: int = 1,
    progress: bool = True,
    echo=None,
    generation=None,
    checkpoint=None,
) -> AttackReport:
    """Evaluate every setting; rows are appended to ``report`` (returned) as they come in.

    ``zeroshot`` is a :class:`~.zeroshot.ZeroShotEvaluator` or None; ``echo`` (e.g. ``print``)
    gets one line per finished measurement, so long sweeps show where they are; ``checkpoint`` (a
    :class:`~.checkpoint.SweepCheckpoint`) keeps every finished setting and restores the ones a
    killed run of the same protocol finished.
    """
    report.record_inputs(corpora, zeroshot)

    if generation is not None:
        report.gen_protocol = generation.protocol()

    def record(setting: AttackSetting, dataset: str, res) -> None:
        if hasattr(res, "items") and hasattr(res, "metrics"):  # a generation task
            report.record_generation({k: v for k, v in _row(setting, "").items() if k != "dataset"}, res)
            if echo:
                shown = ", ".join(f"{m} {a['mean']:.3f}" for m, a in res.metrics.items())
                if res.judge is not None:
                    shown += f", judge {res.judge['mean']:.2f} ({res.judge['unparsed']} unparsed)"
                echo(
                    f"  {setting.label:<22} {dataset:<16} {shown}  ({len(res.items)} items, {res.new_tokens} tokens, "
                    f"{res.seconds:.1f} s, {res.tokens_per_s:.1f} tokens/s)"
                )
            return
        if hasattr(res, "ppl"):
            report.rows.append(
                _row(
                    setting,
                    dataset,
                    ppl=res.ppl,
                    nll=res.nll,
                    tokens=res.tokens,
                    windows=res.windows,
                    seconds=round(res.seconds, 3),
                )
            )
            if echo:
                echo(
                    f"  {setting.label:<22} {dataset:<16} ppl {res.ppl:10.3f}  ({res.tokens} tokens, {res.seconds:.1f} s)"
                )
        else:
            report.rows.append(_row(setting, dataset, acc=res.acc, acc_norm=res.acc_norm, n=res.n, split=res.split))
            if echo:
                echo(f"  {setting.label:<22} {dataset:<16} acc {100 * res.acc:6.1f}  (n={res.n}, {res.split})")

    evaluate_settings(
        model,
        attacker,
        settings,
        corpora,
        zeroshot,
        on_result=record,
        batch_size=batch_size,
        progress=progress,
        generation=generation,
        echo=echo if progress else None,
        resumed=(lambda s: checkpoint.restore(report, s.label, s.label))
        if checkpoint is not None
        else (lambda s: False),
        finished=(lambda s: checkpoint.save(report, s.label)) if checkpoint is not None else (lambda s: None),
    )
    report.restored_bitwise = True
    return report


# ----------------------------------------------------------------------------- super activation
def loss_gap_recovery(report: AttackReport) -> list[dict[str, Any]]:
    """Per corpus/task: original, super weight zeroed, zeroed + super activation restored, and the
    share of the gap the restoration closes (Yu et al.: 42 % of the loss on Llama-7B).

    The share is measured on the loss (mean NLL per token) for corpora and on accuracy for tasks:
    ``(zeroed - restored) / (zeroed - original)``, i.e. 1 = back to the original, 0 = no help."""
    out = []
    for dataset, metric in report.columns():
        key = "nll" if metric == "ppl" else "acc"
        rows = {r["setting"]: r for r in report.rows if r["dataset"] == dataset and key in r}
        orig, zeroed, restored = (rows.get(s) for s in ("clean", "superweight x0", "superweight x0 + SA restored"))
        if not (orig and zeroed and restored):
            continue
        gap = zeroed[key] - orig[key]
        entry = {
            "dataset": dataset,
            "metric": "loss" if key == "nll" else "acc",
            "original": orig[key],
            "zeroed": zeroed[key],
            "restored": restored[key],
            "recovered": (zeroed[key] - restored[key]) / gap if gap else None,
        }
        if key == "nll":
            entry.update(ppl_original=orig["ppl"], ppl_zeroed=zeroed["ppl"], ppl_restored=restored["ppl"])
        out.append(entry)
    return out


def recovery_table(recovery: list[dict[str, Any]]) -> str:
    lines = [
        "| super activation restored | original | SW zeroed | SW zeroed + SA restored | gap recovered |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in recovery:
        share = "-" if e["recovered"] is None else f"{100 * e['recovered']:.0f} %"
        if e["metric"] == "loss":
            lines.append(
                f"| {e['dataset']} loss (ppl) | {e['original']:.4f} ({e['ppl_original']:.2f}) | "
                f"{e['zeroed']:.4f} ({e['ppl_zeroed']:.2f}) | {e['restored']:.4f} ({e['ppl_restored']:.2f}) | {share} |"
            )
        else:
            lines.append(
                f"| {e['dataset']} acc | {100 * e['original']:.1f} | {100 * e['zeroed']:.1f} | "
                f"{100 * e['restored']:.1f} | {share} |"
            )
    return "\n".join(lines)
