"""The evaluation side of ``macdrop compare``: every adapter on ONE loaded base model.

Why one base: loading an 8B base per arm and per task would cost more than the evaluation itself,
and every arm must be scored on exactly the same base weights. So the base is loaded once, each
run's adapter is attached (peft), evaluated under every attack setting, and removed again
(``unload``: peft puts the original modules back); a SHA-256 of every base tensor, taken before
the first adapter and after the last, proves the base came back bit for bit, and the attacker
checks its rows after each adapter.

Robustness: the attacks (top-k zeroing / retaining of the BASE model's massive rows, located once
on the base) edit the frozen base weights UNDER the adapter, so each arm is measured as the paper
measures it: how much the fine-tuned model still depends on those rows.

Items, not only means: every perplexity comes with its per-window NLL sums and every accuracy with
its per-document scores, which the paired statistics (:mod:`.paired`) resample. Each run's items
are cached in ``<comparison>/eval/`` under a key of everything that defines them (base, adapter
marker, corpora, tasks, settings, targets, dtype): a rerun evaluates only what is new.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .attacks import AttackSetting, AttackTargets, ModelAttacker
from .paired import AccuracyItems, MeanAccuracyItems, PerplexityItems
from .perplexity import evaluate_perplexity


def metric_name(kind: str, dataset: str, setting: str) -> str:
    """``ppl/english.txt/clean``, ``acc/arc_easy/zero k=5``, ``acc/mean/retain k=1``."""
    return f"{kind}/{dataset}/{'clean' if setting == 'none' else setting}"


def parse_metric(name: str) -> tuple[str, str, str]:
    kind, rest = name.split("/", 1)
    dataset, setting = rest.rsplit("/", 1)
    return kind, dataset, setting


def fingerprint(model: nn.Module) -> dict[str, str]:
    """SHA-256 of the raw bytes of every parameter and buffer (bitwise identity, any dtype)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        data = t.detach().contiguous().cpu()
        out[name] = hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest() if data.numel() else "empty"
    return out


# ----------------------------------------------------------------------------- item (de)serialisation
def items_to_json(items) -> dict[str, Any]:
    if isinstance(items, PerplexityItems):
        return {"kind": "ppl", "nll": list(items.nll), "tokens": list(items.tokens)}
    if isinstance(items, AccuracyItems):
        return {"kind": "acc", "scores": list(items.scores)}
    return {"kind": "mean_acc", "tasks": [items_to_json(t) for t in items.tasks]}


def items_from_json(data: dict[str, Any]):
    if data["kind"] == "ppl":
        return PerplexityItems(tuple(data["nll"]), tuple(data["tokens"]))
    if data["kind"] == "acc":
        return AccuracyItems(tuple(data["scores"]))
    return MeanAccuracyItems(tuple(items_from_json(t) for t in data["tasks"]))


class OneBaseEvaluator:
    """Evaluates the base and any number of adapters on it; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        model_path: str,
        targets: AttackTargets,
        settings: Sequence[AttackSetting],
        corpora: Sequence = (),
        zeroshot=None,
        *,
        batch_size: int = 1,
        progress: bool = True,
        echo: Optional[Callable[[str], None]] = print,
        protocol: Optional[dict[str, Any]] = None,
        zeroshot_under_attack: bool = True,
    ) -> None:
        self.base = model
        self.model_path = model_path
        self.targets = targets
        self.settings = list(settings)
        self.corpora = list(corpora)
        self.zeroshot = zeroshot
        self.batch_size = batch_size
        self.progress = progress
        self.echo = echo or (lambda _: None)
        self.protocol = protocol or {}
        self.zeroshot_under_attack = zeroshot_under_attack  # False: zero-shot on the clean model only
        self._fingerprint = fingerprint(model)

    # ------------------------------------------------------------------ one model
    def evaluate(self, adapter_dir: Optional[Path] = None, label: str = "base") -> dict[str, Any]:
        """metric name -> items for the base (``adapter_dir`` None) or the base + that adapter."""
        from ..core.architectures import find_ffn_blocks
        from .sweep import attach_adapter

        model = attach_adapter(self.base, adapter_dir, self.model_path) if adapter_dir is not None else self.base
        out: dict[str, Any] = {}
        try:
            attacker = ModelAttacker(model, self.targets, find_ffn_blocks(model))
            if self.zeroshot is not None:
                self.zeroshot.rebind(model)
            for setting in self.settings:
                with attacker.applied(setting):
                    for corpus in self.corpora:
                        res = evaluate_perplexity(model, corpus.windows, f"{label} / {setting.label} / {corpus.source.name}",
                                                  batch_size=self.batch_size, progress=self.progress, per_window=True)
                        out[metric_name("ppl", corpus.source.name, setting.label)] = PerplexityItems(res.window_nll,
                                                                                                     res.window_tokens)
                        self.echo(f"  {label:<28} {setting.label:<12} {corpus.source.name:<16} ppl {res.ppl:10.3f}"
                                  f"  ({res.seconds:.1f} s)")
                    if self.zeroshot is not None and (setting.mode == "none" or self.zeroshot_under_attack):
                        tasks = []
                        for res in self.zeroshot.evaluate(per_item=True):
                            tasks.append(AccuracyItems(res.items))
                            out[metric_name("acc", res.task, setting.label)] = tasks[-1]
                            self.echo(f"  {label:<28} {setting.label:<12} {res.task:<16} acc {100 * res.acc:6.1f}"
                                      f"  (n={res.n})")
                        if len(tasks) > 1:
                            out[metric_name("acc", "mean", setting.label)] = MeanAccuracyItems(tuple(tasks))
            attacker.verify_restored()
        finally:
            if adapter_dir is not None:
                self.base = model.unload()  # the original modules back, adapter gone
        return out

    def verify_base(self) -> None:
        """Raise unless every base tensor is bit for bit what it was before the first adapter."""
        now = fingerprint(self.base)
        changed = [k for k in self._fingerprint if now.get(k) != self._fingerprint[k]]
        if changed or set(now) != set(self._fingerprint):
            raise RuntimeError(f"the base model changed during the evaluation: {(changed or sorted(set(now) ^ set(self._fingerprint)))[:3]}")

    # ------------------------------------------------------------------ cached
    def cache_key(self, adapter_dir: Optional[Path]) -> str:
        marker = None
        if adapter_dir is not None:
            from .compare_runs import MARKER

            path = Path(adapter_dir) / MARKER
            marker = json.loads(path.read_text()) if path.is_file() else str(adapter_dir)
        blob = json.dumps({"protocol": self.protocol, "adapter": marker}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def evaluate_cached(self, cache_file: Path, adapter_dir: Optional[Path] = None, label: str = "base") -> tuple[dict[str, Any], bool]:
        """(items, reused): the cached items when the key matches, else a fresh evaluation (cached)."""
        key = self.cache_key(adapter_dir)
        if cache_file.is_file():
            data = json.loads(cache_file.read_text())
            if data.get("key") == key:
                return {m: items_from_json(v) for m, v in data["items"].items()}, True
        items = self.evaluate(adapter_dir, label)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "label": label, "items": {m: items_to_json(v) for m, v in items.items()}}))
        tmp.replace(cache_file)
        return items, False


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
