"""What the attack and quantization reports share: rows of a sweep and how they were measured.

:class:`SweepReport` is one flat list of rows (``{..., "dataset", "ppl" | "acc", "tokens" | "n",
...}``) plus the protocol that produced them, so the JSON and the CSV say how each number was
measured, and the generation tasks' rows and per-item records; the subclasses
(:class:`~..attack.report.AttackReport`, :class:`~..quantize.report.QuantizationReport`) add what
identifies a row (the attack setting, or bits x block size x clipping x protection), their own
table columns and figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ...core.probing import CsvRows, JsonReport
from .loop import PreparedCorpus


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
        restored = (
            f"weights restored bitwise {self.restored_when}: yes"
            if self.restored_bitwise
            else "weights restored bitwise: not verified (the sweep did not finish)"
        )
        # The restore check closes the last block, right under it, as the command always printed it.
        return "\n\n".join(parts) + ("\n" if parts else "") + restored


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
