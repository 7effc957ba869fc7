"""Small shared pieces of every no-grad probe pass (locator, activation report, super weights).

One place decides how a measurement forward runs: eval mode, no gradients, adapters disabled (a
PeftModel is measured as its pre-trained base), bitsandbytes kept from repacking 4-bit weights
into its CPU layout (which an eval no-grad forward triggers and which changes how the layer trains),
the training flag restored afterwards, so a probe is safe in the middle of training; and how hooks
read activations of the various layouts.
"""

from __future__ import annotations

import csv
import io
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from .storage import keep_canonical_4bit_layout


class StopForward(Exception):
    """Raised from a hook to end a probe pass early (the layers after it are not needed)."""


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (LoRA layers stay in place inside it)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def model_name(model: nn.Module) -> str:
    config = getattr(unwrap_peft(model), "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or type(model).__name__)


def first_tensor(obj: Any) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first element is the hidden state."""
    return obj[0] if isinstance(obj, (tuple, list)) else obj


def per_position(t: torch.Tensor) -> torch.Tensor:
    """A [1, T, D] activation as [T, D] (OPT hands its FFN a flattened [T, D] already)."""
    return t.detach().reshape(-1, t.shape[-1])


def first_position(t: torch.Tensor) -> torch.Tensor:
    """The first token's vector from a [batch, seq, dim] or [seq, dim] activation."""
    return t[0, 0] if t.dim() == 3 else t[0]


def as_batch(model: nn.Module, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``input_ids`` as a 1 x T long tensor on the embeddings' device (the reports index positions
    of one sequence, so a batch of several is refused)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be one non-empty sequence (1 x T), got shape {tuple(ids.shape)}")
    return ids.to(unwrap_peft(model).get_input_embeddings().weight.device)


@torch.no_grad()
def forward_with_hooks(model: nn.Module, input_ids: torch.Tensor, register: Callable[[], list]) -> None:
    """One no-grad eval forward of ``input_ids`` (1 x T) with the hooks ``register()`` installs.

    A hook may raise :class:`StopForward` to end the pass early; hooks are always removed.
    """
    handles = register()
    was_training = model.training
    disable = getattr(model, "disable_adapter", None)
    try:
        model.eval()
        with (
            disable() if callable(disable) and hasattr(model, "peft_config") else nullcontext(),
            keep_canonical_4bit_layout(model),
        ):
            try:
                model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


class JsonReport:
    """Mixin for the reports every command can write with ``--json`` (they define ``payload``).

    Every document opens with ``schema`` (what it is and the version of its keys, e.g.
    ``macdrop.attack/1``: a reader checks it before reading the keys; docs/cli.md lists each
    document's keys) and ``macdrop_version`` (the package that wrote it)."""

    schema: ClassVar[str] = ""

    def payload(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        from .. import __version__

        return {"schema": self.schema, "macdrop_version": __version__, **self.payload()}

    def write_json(self, path: str | Path) -> Path:
        """Atomically (a reader never finds a cut file; a symlink at ``path`` is replaced, not followed)."""
        from .atomic_write import write_text_atomic

        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")


class CsvRows:
    """Mixin for the reports that also write ``--csv``: one line per dict of ``self.rows``, the
    columns every key any row has, in first-seen order."""

    rows: list[dict[str, Any]]

    def to_csv(self) -> str:
        keys: dict[str, None] = {}
        for r in self.rows:
            keys.update(dict.fromkeys(r))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(keys), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_csv())
        return path
