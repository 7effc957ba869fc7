"""The report of ``macdrop compare``: per-arm values over seeds, paired differences, a verdict.

Why one object for JSON, CSV, markdown and stdout: the numbers a user reads in the terminal, the
ones a script reads from the JSON and the ones in the markdown report must be the same numbers.
JSON: ``runs`` (one row per arm x seed: ``arm``, ``seed``, ``output_dir``, ``metrics`` as a flat
dict ``name -> value``, plus what the training did) and ``paired`` (per MacDrop arm and metric:
``metric``, ``mean_diff``, ``low``, ``high``, ``n``, seeds, per-seed differences, verdict). Metric
names are ``KIND/DATASET/SETTING``: ``ppl/english.txt/clean``, ``acc/arc_easy/zero k=5``,
``acc/mean/retain k=1`` (see :func:`.compare_eval.metric_name`). CSV: one line per run and metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ...core.probing import CsvRows, JsonReport
from .evaluation import parse_metric
from .paired import PairedDifference, PairedError, paired_difference, seed_spread


def higher_is_better(metric: str) -> bool:
    return parse_metric(metric)[0] in ("acc", "gen", "judge")


def _fmt(metric: str, value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if parse_metric(metric)[0] == "acc" else f"{value:.3f}"


def _fmt_diff(metric: str, value: float) -> str:
    return f"{100 * value:+.2f}" if parse_metric(metric)[0] == "acc" else f"{value:+.3f}"


def pair_all(arms, seeds, items: dict, *, iterations: int, confidence: float) -> list[PairedDifference]:
    """Every MacDrop arm against its plain arm, on every metric both have."""
    out = []
    for arm in arms:
        if not arm.macdrop or arm.control is None:
            continue
        for metric in items[(arm.name, seeds[0])]:
            missing = [(a, s) for a in (arm.name, arm.control) for s in seeds if metric not in items[(a, s)]]
            if missing:
                a, s = missing[0]
                raise PairedError(
                    f"{metric}: not measured for {a} seed {s} although it is for {arm.name} seed {seeds[0]} "
                    "(results of another version in the eval cache?): delete the comparison's eval/ folder and rerun"
                )
            control = {s: items[(arm.control, s)][metric] for s in seeds}
            treatment = {s: items[(arm.name, s)][metric] for s in seeds}
            out.append(
                paired_difference(
                    metric,
                    control,
                    treatment,
                    treatment_name=arm.name,
                    control_name=arm.control,
                    higher_is_better=higher_is_better(metric),
                    iterations=iterations,
                    confidence=confidence,
                )
            )
    return out


@dataclass
class RunRecord:
    arm: str
    seed: Optional[int]
    output_dir: Optional[str]
    metrics: dict[str, float]
    train: dict[str, Any] = field(default_factory=dict)  # seconds, steps, final loss, p at start/end
    evaluation_reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "seed": self.seed,
            "output_dir": self.output_dir,
            "metrics": self.metrics,
            "train": self.train,
            "evaluation_reused": self.evaluation_reused,
        }


@dataclass
class CompareReport(JsonReport, CsvRows):
    schema = "macdrop.compare/1"
    base_yaml: str
    output_dir: str
    seeds: list[int]
    arms: list[dict[str, Any]]
    model: str
    protocol: dict[str, Any] = field(default_factory=dict)
    base: Optional[RunRecord] = None
    runs: list[RunRecord] = field(default_factory=list)
    paired: list[PairedDifference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    restored_bitwise: bool = False
    cost: dict[str, float] = field(default_factory=dict)
    #: runs side by side (--parallel/--devices/--ray): one entry per job, where it ran, its times
    schedule: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ views
    def metric_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.runs:
            seen.update(dict.fromkeys(r.metrics))
        return list(seen)

    def arm_names(self) -> list[str]:
        return list(dict.fromkeys(r.arm for r in self.runs))

    def arm_values(self, arm: str, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs if r.arm == arm and metric in r.metrics]

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for arm in self.arm_names():
            for metric in self.metric_names():
                values = self.arm_values(arm, metric)
                if values:
                    mean, sd = seed_spread(values)
                    out.append(
                        {
                            "arm": arm,
                            "metric": metric,
                            "mean": mean,
                            "sd": sd,
                            "seeds": len(values),
                            "min": min(values),
                            "max": max(values),
                        }
                    )
        return out

    def verdicts(self) -> list[str]:
        """One line per MacDrop arm: the clean metrics (the question "does it help") apart from the
        metrics under attack (robustness); each metric's own 95 % verdict, so with many metrics a
        chance hit is expected now and then: read the clean line first."""
        lines = []
        for treatment in dict.fromkeys(d.treatment for d in self.paired):
            mine = [d for d in self.paired if d.treatment == treatment]
            parts = []
            for title, group in (
                ("clean", [d for d in mine if parse_metric(d.metric)[2] == "clean"]),
                ("under attack", [d for d in mine if parse_metric(d.metric)[2] != "clean"]),
            ):
                if not group:
                    continue
                better = [d.metric for d in group if d.direction == "better"]
                worse = [d.metric for d in group if d.direction == "worse"]
                few = [d.metric for d in group if d.extra.get("no_interval")]
                if few:
                    parts.append(f"{title}: no verdict on {', '.join(few)} (too few items for an interval)")
                    group = [d for d in group if not d.extra.get("no_interval")]
                    if not group:
                        continue
                if not better and not worse:
                    parts.append(f"{title}: no difference detectable on any of {len(group)} metrics")
                    continue
                words = ([f"better on {', '.join(better)}"] if better else []) + (
                    [f"worse on {', '.join(worse)}"] if worse else []
                )
                rest = len(group) - len(better) - len(worse)
                parts.append(
                    f"{title}: " + "; ".join(words) + (f" (not detectable on the other {rest})" if rest else "")
                )
            seeds = len(mine[0].seeds)
            lines.append(
                f"{treatment} vs {mine[0].control}: "
                + " | ".join(parts)
                + f" ({seeds} seed{'s' if seeds != 1 else ''})"
            )
        return lines

    @property
    def rows(self) -> list[dict[str, Any]]:  # CsvRows: long format
        out = []
        for r in ([self.base] if self.base else []) + self.runs:
            for metric, value in r.metrics.items():
                kind, dataset, setting = parse_metric(metric)
                out.append(
                    {
                        "arm": r.arm,
                        "seed": r.seed,
                        "output_dir": r.output_dir,
                        "metric": metric,
                        "kind": kind,
                        "dataset": dataset,
                        "setting": setting,
                        "value": value,
                    }
                )
        return out

    def payload(self) -> dict[str, Any]:
        return {
            "base_yaml": self.base_yaml,
            "output_dir": self.output_dir,
            "model": self.model,
            "seeds": self.seeds,
            "arms": self.arms,
            "protocol": self.protocol,
            "base": self.base.to_dict() if self.base else None,
            "runs": [r.to_dict() for r in self.runs],
            "summary": self.summary(),
            "paired": [d.to_dict() for d in self.paired],
            "verdict": self.verdicts(),
            "notes": self.notes,
            "restored_bitwise": self.restored_bitwise,
            "cost_seconds": self.cost,
            **({"schedule": self.schedule} if self.schedule else {}),
        }

    # ------------------------------------------------------------------ what the command prints and draws
    def table(self) -> str:
        """stdout: the headline metrics per arm, their paired differences, the verdicts, the restore check."""
        headline = self.headline_metrics()
        lines = ["per arm (mean ± sd over seeds):", self.arms_table(headline), ""]
        lines += ["paired difference (arm − control):", self.paired_table(headline), ""]
        lines += [f"verdict: {line}" for line in self.verdicts()]
        restored = "yes" if self.restored_bitwise else "not verified"
        lines.append(f"base weights restored bitwise after every adapter (SHA-256 of every tensor): {restored}")
        if self.cost:
            lines.append("cost: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.cost.items()))
        for j in self.schedule:
            trained = f"trained {j['train_seconds']:.0f} s" if j.get("trained") and j.get("train_seconds") else "-"
            evaluated = "evaluation reused" if j.get("reused") else f"evaluated {j.get('eval_seconds', 0):.0f} s"
            lines.append(f"  {j['job']:<28} {j['where']:<24} {trained:<16} {evaluated:<20} {j['seconds']:.0f} s wall")
        return "\n".join(lines)

    def plots(self, folder: str | Path) -> dict[str, Path]:
        """compare_metrics.png, compare_paired.png, compare_robustness.png (with attacks) and
        compare_loss.png (read from the runs' trainer_state.json), by name."""
        from .plots import plot_losses, plot_metrics, plot_paired, plot_robustness
        from .runs import read_log_history

        folder = Path(folder)
        out = {"metrics": plot_metrics(self, folder / "compare_metrics.png")}
        if self.paired:
            out["paired"] = plot_paired(self, folder / "compare_paired.png")
        if any(" k=" in m for m in self.metric_names()):
            out["robustness"] = plot_robustness(self, folder / "compare_robustness.png")
        histories = {(r.arm, r.seed): read_log_history(Path(r.output_dir)) for r in self.runs}
        out["loss"] = plot_losses(histories, folder / "compare_loss.png")
        return out

    def plot(self, folder: str | Path) -> list[Path]:
        return list(self.plots(folder).values())

    def write_markdown(self, path: str | Path, plots: Optional[dict[str, Path]] = None) -> Path:
        """report.md, its figures linked relative to it."""
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rel = {k: os.path.relpath(Path(v).resolve(), path.parent.resolve()) for k, v in (plots or {}).items()}
        path.write_text(self.markdown(rel))
        return path

    # ------------------------------------------------------------------ tables
    def arms_table(self, metrics: Optional[list[str]] = None) -> str:
        """Markdown: one line per metric, one column per arm: mean +- sd over seeds (base: one value)."""
        metrics = metrics or self.metric_names()
        arms = self.arm_names()
        head = (["base"] if self.base else []) + arms
        lines = ["| metric | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        for m in metrics:
            cells = [_fmt(m, self.base.metrics.get(m))] if self.base else []
            for arm in arms:
                v = self.arm_values(arm, m)
                if not v:
                    cells.append("-")
                    continue
                mean, sd = seed_spread(v)
                cells.append(f"{_fmt(m, mean)} ± {_fmt(m, sd)}" if len(v) > 1 else _fmt(m, mean))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def paired_table(self, metrics: Optional[list[str]] = None) -> str:
        lines = [
            "| metric | arm − control | mean diff | interval | n | per seed | verdict |",
            "|---|---|---:|---:|---:|---|---|",
        ]
        for d in self.paired:
            if metrics and d.metric not in metrics:
                continue
            conf = f"{round(100 * d.confidence)} %"
            per_seed = ", ".join(_fmt_diff(d.metric, x) for x in d.per_seed)
            word = {"better": "better", "worse": "worse", "none": "not detectable"}[d.direction]
            interval = f"{conf} [{_fmt_diff(d.metric, d.low)}, {_fmt_diff(d.metric, d.high)}]"
            if d.extra.get("no_interval"):
                word, interval = "no verdict: too few items", "–"
            lines.append(
                f"| {d.metric} | {d.treatment} − {d.control} | {_fmt_diff(d.metric, d.mean_diff)} | "
                f"{interval} | {d.n} | {per_seed} | {word} |"
            )
        return "\n".join(lines)

    def headline_metrics(self) -> list[str]:
        """What stdout shows: the clean metrics and the largest-k attack of each mode."""
        names = self.metric_names()
        by_mode: dict[str, int] = {}
        for m in names:
            setting = parse_metric(m)[2]
            if setting != "clean" and " k=" in setting:
                mode, k = setting.split(" k=")
                by_mode[mode] = max(by_mode.get(mode, 0), int(k))
        keep = {f"{mode} k={k}" for mode, k in by_mode.items()} | {"clean"}
        return [m for m in names if parse_metric(m)[2] in keep]

    def markdown(self, plots: Optional[dict[str, str]] = None) -> str:
        seeds = ", ".join(map(str, self.seeds))
        out = [
            f"# macdrop compare: {self.base_yaml}",
            "",
            f"Model `{self.model}`; arms {', '.join(self.arm_names())}; seeds {seeds}; runs under `{self.output_dir}`.",
            "",
            "## Verdict",
            "",
        ]
        out += [f"- {line}" for line in self.verdicts()] or ["- (no paired comparison)"]
        out += [
            "",
            "What the intervals mean: a paired bootstrap over evaluation items (perplexity windows, "
            "zero-shot documents), one draw per iteration for both arms and every seed (the seeds score the "
            "same items), the per-seed differences averaged over seeds; `n` = distinct items. It covers "
            "evaluation-sample noise for these adapters, not another training seed: a difference counts only "
            "if the interval excludes 0 and every seed agrees in sign. Each metric is judged on its own (no "
            "correction for the number of metrics).",
            "",
            "## Per arm (mean ± sd over seeds)",
            "",
            self.arms_table(),
            "",
            "## Paired differences",
            "",
            self.paired_table(),
            "",
        ]
        if plots:
            out += ["## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
        inputs = [
            f"- {c['dataset']}: {c['prefix_summary']}"
            for c in self.protocol.get("corpora", [])
            if c.get("prefix_summary")
        ]
        zeroshot_prefix = (self.protocol.get("zeroshot") or {}).get("prefix")
        if zeroshot_prefix:
            inputs.append(f"- zero-shot (lm-eval, the tokenizer's special tokens): {zeroshot_prefix['prefix_summary']}")
        if inputs:
            out += ["## What went before each text", ""] + inputs + [""]
        out += [
            "## Runs",
            "",
            "| arm | seed | output_dir | train s | steps | final loss |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for r in self.runs:
            t = r.train
            loss = t.get("final_loss")
            out.append(
                f"| {r.arm} | {r.seed} | `{r.output_dir}` | {t.get('seconds', '-')} | {t.get('steps', '-')} | "
                f"{'-' if loss is None else f'{loss:.4f}'} |"
            )
        if self.cost:
            out += ["", "Cost: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.cost.items())]
        if self.schedule:
            out += [
                "",
                "Jobs side by side:",
                "",
                "| job | where | train s | evaluate s | wall s |",
                "|---|---|---:|---:|---:|",
            ]
            for j in self.schedule:
                trained = f"{j['train_seconds']:.0f}" if j.get("trained") and j.get("train_seconds") else "-"
                evaluated = "reused" if j.get("reused") else f"{j.get('eval_seconds', 0):.0f}"
                out.append(f"| {j['job']} | {j['where']} | {trained} | {evaluated} | {j['seconds']:.0f} |")
        if self.notes:
            out += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        out += [
            "",
            f"Base weights restored bit for bit after all adapters: {'yes' if self.restored_bitwise else 'no'}",
            "",
        ]
        return "\n".join(out)
