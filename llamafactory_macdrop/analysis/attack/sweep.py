"""One sweep loop for every in-place edit of a loaded model: apply a setting, evaluate, undo, verify.

Why one loop: an attack sweep (``macdrop attack``), a quantization sweep (``macdrop quantize``)
and the one-base evaluation of ``macdrop compare`` all do the same thing: for every setting, edit
the weights the evaluators already hold, evaluate every prepared corpus (perplexity) and, if asked,
lm-eval's zero-shot tasks, undo the edit, and at the end check that every touched weight is back
bit for bit. :func:`evaluate_settings` is that loop, over anything that implements
:class:`InPlaceEdit` (``applied(setting)`` as a context manager that always undoes, and
``verify_restored()``): :class:`~.attacks.ModelAttacker` and
:class:`~.quantization.ModelQuantizer`. Each caller turns the results into its own shape through
one callback (rows for a report, per-item results for paired statistics); a new family of
measurements (generation tasks, long context) plugs in here once.

:class:`SweepReport` is what the attack and quantization reports share: one flat list of rows
(``{..., "dataset", "ppl" | "acc", "tokens" | "n", ...}``) plus the protocol that produced them, so
the JSON and the CSV say how each number was measured; the subclasses add what identifies a row
(the attack setting, or bits x block size x clipping x protection) and their own table columns.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from torch import nn

from ...core.probing import CsvRows, JsonReport
from ...core.text_prefix import TextPrefix
from ..evaluate.perplexity import PerplexityProtocol, TextSource, Windows, evaluate_perplexity, make_windows, tokenize
from .attacks import AttackSetting, ModelAttacker


@dataclass
class PreparedCorpus:
    """A corpus tokenized and cut into windows once, evaluated under every setting.

    ``protocol`` is the resolved one (``bos`` = the placement used) and ``prefix`` the tokens put
    there (:func:`~.perplexity.resolve_protocol`); ``source.protocol`` is what was asked."""

    source: TextSource
    windows: Windows
    protocol_used: Optional[PerplexityProtocol] = None
    prefix: Optional[TextPrefix] = None

    def protocol(self) -> dict[str, Any]:
        used = self.protocol_used or self.source.protocol
        out = {
            "dataset": self.source.name,
            "origin": self.source.origin,
            **used.to_dict(),
            "bos_requested": self.source.protocol.bos,
        }
        if self.prefix is not None:
            out.update(self.prefix.protocol())
        return {**out, "windows": self.windows.count, "predicted_tokens": self.windows.predicted_tokens}


def prepare_corpus(
    source: TextSource, tokenizer: Any, protocol: PerplexityProtocol, prefix: TextPrefix
) -> PreparedCorpus:
    """``source`` tokenized once (no special tokens) and cut into ``protocol``'s windows with ``prefix``
    (both from :func:`~.perplexity.resolve_protocol`)."""
    windows = make_windows(tokenize(tokenizer, source.text), protocol, prefix.token_ids)
    return PreparedCorpus(source, windows, protocol, prefix)


class InPlaceEdit(Protocol):
    """What a sweep needs of an edit: apply one setting for a block (undone on exit, errors too)
    and check at the end that every weight it may touch is back bit for bit."""

    def applied(self, setting: Any) -> AbstractContextManager[None]: ...

    def verify_restored(self) -> None: ...


@dataclass(kw_only=True)
class SweepReport(JsonReport, CsvRows):
    """Rows of a sweep and how they were measured (subclasses say what identifies a row: :meth:`key`)."""

    perplexity_protocol: list[dict[str, Any]] = field(default_factory=list)
    zeroshot_splits: dict[str, str] = field(default_factory=dict)
    zeroshot_limit: Optional[int] = None
    zeroshot_prefix: Optional[dict[str, Any]] = None  # what lm-eval puts first (the tokenizer's own)
    probe_prefix: Optional[dict[str, Any]] = None  # what went before the probe text
    rows: list[dict[str, Any]] = field(default_factory=list)
    restored_bitwise: bool = False
    #: generation tasks: one row per setting x task x metric (``setting``, ``task``, ``metric``, ``value``, ``n``;
    #: ``unparsed`` for the judge), the per-item records (``--gen-items`` JSONL) and the tasks' protocol
    gen_rows: list[dict[str, Any]] = field(default_factory=list)
    gen_items: list[dict[str, Any]] = field(default_factory=list)
    gen_protocol: Optional[dict[str, Any]] = None

    def record_generation(self, key: dict[str, Any], res) -> None:
        """A :class:`~..evaluate.gen_tasks.GenTaskResult` of the setting ``key`` (the row's identifying keys)."""
        for metric, agg in res.metrics.items():
            self.gen_rows.append(
                {
                    **key,
                    "task": res.task,
                    "metric": metric,
                    "value": agg["mean"],
                    "n": agg["n"],
                    "seconds": round(res.seconds, 3),
                    "new_tokens": res.new_tokens,
                    **({"peak_memory_mb": res.peak_memory_mb} if res.peak_memory_mb is not None else {}),
                }
            )
        for cell in res.cells:  # the needle's length x depth grid
            for metric, agg in cell["metrics"].items():
                self.gen_rows.append(
                    {
                        **key,
                        "task": res.task,
                        "metric": metric,
                        "length": cell["length"],
                        "depth": cell["depth"],
                        "value": agg["mean"],
                        "n": agg["n"],
                    }
                )
        if res.judge is not None:
            self.gen_rows.append(
                {
                    **key,
                    "task": res.task,
                    "metric": "judge",
                    "value": res.judge["mean"],
                    "n": res.judge["n"],
                    "unparsed": res.judge["unparsed"],
                    "seconds": round(res.judge_seconds, 3),
                }
            )
        self.gen_items += [{**key, **item} for item in res.items]

    def write_gen_items(self, path) -> Path:
        """Per item and setting: prompt turns, outputs, references, scores, judgement (JSON lines)."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in self.gen_items))
        return path

    def gen_table(self, key_of: Callable[[dict[str, Any]], Any], label: Callable[[Any], str]) -> str:
        """Markdown: one line per setting, one column per task x metric (judge: mean 1-5, unparsed)."""
        overall = [r for r in self.gen_rows if "length" not in r]
        cols = list(dict.fromkeys((r["task"], r["metric"]) for r in overall))
        head = [f"{t} {m}" for t, m in cols]
        lines = ["| setting | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        for key in dict.fromkeys(key_of(r) for r in overall):
            cells = []
            for t, m in cols:
                row = next((r for r in overall if key_of(r) == key and r["task"] == t and r["metric"] == m), None)
                if row is None or row["value"] != row["value"]:  # missing, or nan (nothing scored)
                    cells.append(
                        "-"
                        if row is None
                        else f"- (n=0{', unparsed ' + str(row['unparsed']) if row.get('unparsed') else ''})"
                    )
                elif m == "judge":
                    cells.append(
                        f"{row['value']:.2f}" + (f" ({row['unparsed']} unparsed)" if row.get("unparsed") else "")
                    )
                else:
                    cells.append(f"{row['value']:.3f}" if row["value"] <= 1 else f"{row['value']:.1f}")
            lines.append(f"| {label(key)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def grid_table(self, key_of: Callable[[dict[str, Any]], Any], label: Callable[[Any], str]) -> str:
        """Markdown, per setting and grid task (the needle): accuracy per length (rows) x depth (columns)."""
        grid = [r for r in self.gen_rows if "length" in r]
        blocks = []
        for key in dict.fromkeys(key_of(r) for r in grid):
            for task, metric in dict.fromkeys((r["task"], r["metric"]) for r in grid if key_of(r) == key):
                rows = [r for r in grid if key_of(r) == key and r["task"] == task and r["metric"] == metric]
                depths = sorted({r["depth"] for r in rows})
                lines = [
                    f"{task} {metric}, {label(key)}:",
                    "| length \\ depth % | " + " | ".join(str(d) for d in depths) + " |",
                    "|---:|" + "---:|" * len(depths),
                ]
                for length in sorted({r["length"] for r in rows}):
                    cell = {r["depth"]: r["value"] for r in rows if r["length"] == length}
                    lines.append(
                        f"| {length} | "
                        + " | ".join(f"{cell[d]:.2f}" if d in cell and cell[d] == cell[d] else "-" for d in depths)
                        + " |"
                    )
                blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def record_inputs(self, corpora: Sequence["PreparedCorpus"], zeroshot=None) -> None:
        """The protocol of every corpus and of the zero-shot tasks, before the first row."""
        self.perplexity_protocol = [c.protocol() for c in corpora]
        if zeroshot is not None:
            self.zeroshot_splits, self.zeroshot_limit = zeroshot.splits(), zeroshot.limit
            prefix = getattr(zeroshot, "prefix", None)
            self.zeroshot_prefix = prefix.protocol() if prefix is not None else None

    def zeroshot_dict(self) -> Optional[dict[str, Any]]:
        if not self.zeroshot_splits:
            return None
        return {
            "splits": self.zeroshot_splits,
            "limit": self.zeroshot_limit,
            "harness": "lm-eval",
            "prefix": self.zeroshot_prefix,
        }

    # ------------------------------------------------------------------ views
    @staticmethod
    def key(row: dict[str, Any]) -> Any:
        raise NotImplementedError

    def keys(self) -> list[Any]:
        """The row keys (settings) in the order they were run."""
        return list(dict.fromkeys(self.key(r) for r in self.rows))

    def columns(self) -> list[tuple[str, str]]:
        """(dataset, metric) in first-seen order."""
        seen = {}
        for r in self.rows:
            seen.setdefault((r["dataset"], "ppl" if "ppl" in r else "acc"), None)
        return list(seen)

    def value(self, key: Any, dataset: str, metric: str) -> Optional[float]:
        """The metric of one setting (its key) on one corpus or task."""
        for r in self.rows:
            if self.key(r) == key and r["dataset"] == dataset and metric in r:
                return r[metric]
        return None

    def metric_cells(self, key: Any, ppl_text: Callable[[float], str] = lambda v: f"{v:.2f}") -> list[str]:
        """One setting's cells: perplexity per corpus, accuracy (%) per task."""
        cells = []
        for d, m in self.columns():
            v = self.value(key, d, m)
            cells.append("-" if v is None else (ppl_text(v) if m == "ppl" else f"{100 * v:.1f}"))
        return cells

    def metric_head(self) -> list[str]:
        return [f"{d} ppl" if m == "ppl" else f"{d} acc" for d, m in self.columns()]

    def input_lines(self) -> list[str]:
        return input_lines(self.perplexity_protocol, self.zeroshot_prefix, self.probe_prefix)

    # ------------------------------------------------------------------ what the command prints and draws
    restored_when = "after every setting"  # the restore check's words in :meth:`table`

    def results_table(self) -> str:
        """Markdown: one line per setting (the subclass's columns)."""
        raise NotImplementedError

    def setting_label(self, key: Any) -> str:
        """How a setting is named in the tables (the attack's label, the quantization's description)."""
        return str(key)

    def extra_tables(self) -> list[str]:
        """Blocks after the results (the attack's super-activation recovery)."""
        return []

    def closing_blocks(self) -> list[str]:
        """Blocks after the generation tables (the attack's greedy texts)."""
        return []

    def table(self) -> str:
        """Everything the command prints after the sweep: results, generation tables, the restore check."""
        parts = [self.results_table()] if self.rows else []
        parts += self.extra_tables()
        if self.gen_rows:
            parts.append(self.gen_table(self.key, self.setting_label))
            grid = self.grid_table(self.key, self.setting_label)
            if grid:
                parts.append(grid)
        parts += self.closing_blocks()
        parts.append(
            f"weights restored bitwise {self.restored_when}: yes"
            if self.restored_bitwise
            else "weights restored bitwise: not verified (the sweep did not finish)"
        )
        return "\n\n".join(parts)


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
        from .plots import plot_attack_sweep, plot_generation_sweep, plot_needle_heatmap, plot_superweight_scaling

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


def input_lines(
    perplexity_protocol: Sequence[dict[str, Any]],
    zeroshot_prefix: Optional[dict[str, Any]] = None,
    probe_prefix: Optional[dict[str, Any]] = None,
) -> list[str]:
    """Above a results table: what went before each corpus, the zero-shot prompts and the probe text."""
    out = [f"{p['dataset']}: {p['prefix_summary']}" for p in perplexity_protocol if p.get("prefix_summary")]
    if zeroshot_prefix:
        out.append(
            f"zero-shot (lm-eval encodes with the tokenizer's special tokens): {zeroshot_prefix['prefix_summary']}"
        )
    if probe_prefix:
        out.append(f"probe text: {probe_prefix['prefix_summary']}")
    return [f"input: {line}" for line in out]


def _row(setting: AttackSetting, dataset: str, **values: Any) -> dict[str, Any]:
    row = {"mode": setting.mode, "k": setting.k, "setting": setting.label, "dataset": dataset}
    if setting.scale is not None:
        row["scale"] = setting.scale
    if setting.fill is not None:
        row["fill"] = setting.fill
    row.update(values)
    return row


def evaluate_settings(
    model: nn.Module,
    editor: InPlaceEdit,
    settings: Sequence[Any],
    corpora: Sequence[PreparedCorpus] = (),
    zeroshot=None,
    *,
    on_result: Callable[[Any, str, Any], None],
    label: Callable[[Any], str] = lambda s: s.label,
    batch_size: int = 1,
    progress: bool = True,
    per_item: bool = False,
    zeroshot_for: Callable[[Any], bool] = lambda s: True,
    generation=None,
    generation_for: Callable[[Any], bool] = lambda s: True,
    echo: Optional[Callable[[str], None]] = None,
    resumed: Callable[[Any], bool] = lambda s: False,
    finished: Callable[[Any], None] = lambda s: None,
) -> None:
    """THE sweep: for every setting, ``editor.applied(setting)``, every corpus's perplexity, (where
    ``zeroshot_for(setting)``) the zero-shot tasks and (where ``generation_for(setting)``) the
    generation tasks, each result handed to ``on_result(setting, dataset, result)`` as it comes in
    (a :class:`~..evaluate.perplexity.PerplexityResult`, a :class:`~..evaluate.zeroshot.ZeroShotResult`
    or a :class:`~..evaluate.gen_tasks.GenTaskResult`); undone after each setting, verified bit for
    bit at the end.

    ``per_item``: per-window NLLs and per-document scores too (paired statistics); generation
    results always carry their items. ``generation``: a :class:`~..evaluate.gen_tasks.GenerationSuite`;
    ``echo`` gets its progress lines. ``resumed(setting)`` True skips a setting whose results the
    caller already has (a checkpoint); ``finished(setting)`` is called after each evaluated one."""
    for setting in settings:
        if resumed(setting):
            continue
        with editor.applied(setting):
            for corpus in corpora:
                res = evaluate_perplexity(
                    model,
                    corpus.windows,
                    f"{label(setting)} / {corpus.source.name}",
                    batch_size=batch_size,
                    progress=progress,
                    per_window=per_item,
                )
                on_result(setting, corpus.source.name, res)
            if zeroshot is not None and zeroshot_for(setting):
                for res in zeroshot.evaluate(per_item=per_item) if per_item else zeroshot.evaluate():
                    on_result(setting, res.task, res)
            if generation is not None and generation_for(setting):
                for res in generation.evaluate(label(setting), echo=echo):
                    on_result(setting, res.task, res)
        finished(setting)
    editor.verify_restored()


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
        orig, zeroed, restored = (rows.get(s) for s in ("none", "superweight x0", "superweight x0 + SA restored"))
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
