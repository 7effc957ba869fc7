"""Super weights (Yu et al. 2024): the single down-projection weight behind the massive activation.

Why: the massive activation is written into the residual stream by the down projection of the
origin layer; Yu et al. find that one weight of it does most of the writing, and that its
column is the intermediate unit with the largest |value| there, i.e. the locator's top-1 index
(Llama-2-7B 7890, Mistral-7B 7310). Finding it independently is a cross-check of the locator.

Rule (one forward pass, all positions of the input):

1. Per layer with a dense down projection, the input spike is max |down input| over positions
   and intermediate units (its unit is the column ``col``), the output spike is max |down output|
   over positions and hidden dims (its dim is the row ``row``); the candidate weight is
   ``W_down[row, col]`` (``W[col, row]`` for GPT-2's Conv1D).
2. A layer is kept when its output spike exceeds ``threshold``, or, without one, when it is at
   least :data:`RELATIVE` (0.5) times the largest output spike of any layer. A relative rule,
   because scales differ between models; Yu et al. see the super weight's output spike stand
   orders of magnitude above the other layers, so 0.5 keeps only the layers that compete with it.
3. Kept layers are ranked: those whose down output GROWS the residual stream at (position, row)
   (``creates``) before those that shrink it, then by output spike, largest first; ``top`` are
   returned. The tie-break matters because the last layers of a model often write the massive
   activation back down before the final norm with a spike of the same order (SmolLM2-135M:
   layer 28, 14,253 against 24,882 at the origin layer 11); that weight matters too, but it is
   not where the activation comes from.

``share`` is the fraction of the output spike that the single weight contributes
(``inter[pos, col] * W[row, col] / out[pos, row]``): near 1 for a true single super weight,
lower when several units write into the same dimension (SmolLM2-135M layer 11: units 1229 and
1487 both do).

MoE layers are skipped (their experts' down projections are not modules). The forward runs like
the activation report: eval, no grad, adapters disabled, training flag restored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ...core.architectures import FFNBlock, base_layer, find_ffn_blocks
from ...core.probing import (
    JsonReport,
    as_batch,
    first_tensor,
    forward_with_hooks,
    model_name,
    per_position,
    unwrap_peft,
)
from ...core.text_prefix import TextPrefix

RELATIVE = 0.5
RULE = (
    "col = argmax |down input|, row = argmax |down output| per layer; keep layers with output spike > threshold "
    f"(default: >= {RELATIVE} x the largest); rank layers that grow the residual first, then by output spike"
)


@dataclass
class DownSpikes:
    """The largest |input| and |output| of one layer's down projection, with where they are, and
    the residual stream at the output spike's (position, row) entering and leaving the layer."""

    layer: int
    input_spike: float
    input_position: int
    col: int
    output_spike: float
    output_position: int
    row: int
    residual_in: float
    residual_out: float

    @property
    def creates(self) -> bool:
        return self.residual_out > self.residual_in


@dataclass
class SuperWeight:
    """A candidate super weight ``W_down[row, col]`` of ``layer`` (``weight`` is its value)."""

    layer: int
    row: int
    col: int
    weight: float
    input_spike: float
    output_spike: float
    position: int  # token position of the output spike
    share: float  # fraction of the output spike this one weight writes
    creates: bool  # the down output grows the residual stream there (not a late-layer cancel)
    module: str = ""  # parameter name of W_down
    #: cross-check with the locator (:meth:`SuperWeightReport.check_against`): the rank of ``col``
    #: among the located massive rows of the same layer (1 = top-1), None when it is not one of them
    massive_row_rank: Optional[int] = None


@dataclass
class SuperWeightReport(JsonReport):
    schema = "macdrop.superweight/1"
    model: str
    input_ids: list[int]
    threshold: Optional[float]
    candidates: list[SuperWeight]
    layers: list[DownSpikes] = field(default_factory=list)
    rule: str = RULE
    prefix: Optional[TextPrefix] = None  # what was put before the text (set by the caller)
    #: the locator's answer the candidates were checked against (:meth:`check_against`)
    located: Optional[dict[str, Any]] = None
    published: Optional[dict[str, Any]] = None  # the published position, where the model matches one
    warnings: list[str] = field(default_factory=list)
    #: the stop-word shift with the super weight(s) zeroed (``--stopwords``; its own JSON, ``--stopwords-json``)
    stopwords: Any = field(default=None, repr=False)

    def payload(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("stopwords")
        out["prefix"] = self.prefix.protocol() if self.prefix is not None else None
        for spikes, d in zip(self.layers, out["layers"]):
            d["creates"] = spikes.creates
        for c, d in zip(self.candidates, out["candidates"]):
            d["col_in_massive_rows"] = c.massive_row_rank is not None if self.located is not None else None
            d["col_is_massive_top1"] = c.massive_row_rank == 1 if self.located is not None else None
        return out

    def check_against(self, layer: int, indices: Sequence[int], probe: str = "") -> None:
        """Cross-check with the locator: Yu et al.'s super weight sits in the down projection's column
        that the massive intermediate unit feeds, so the first candidate's column should be the
        located layer's top-1 row. Records each candidate's rank there and warns when the first
        candidate's layer or column disagrees (a sign the probe text starts with a token the model
        is not fed first)."""
        self.located = {"layer": layer, "indices": [int(i) for i in indices], "probe": probe}
        for c in self.candidates:
            c.massive_row_rank = list(indices).index(c.col) + 1 if c.layer == layer and c.col in indices else None
        first = next((c for c in self.candidates if c.creates), self.candidates[0] if self.candidates else None)
        if first is None:
            return
        if first.layer != layer:
            self.warnings.append(
                f"the super weight's layer {first.layer} differs from the massive layer {layer} the locator finds"
                f"{' (' + probe + ')' if probe else ''}: check what the probe text starts with (--bos, --bos-token)"
            )
        elif first.massive_row_rank != 1:
            self.warnings.append(
                f"the super weight's column {first.col} is not the locator's top-1 massive row {indices[0]} of layer {layer}"
                + (f" (it is rank {first.massive_row_rank})" if first.massive_row_rank else " (nor any of its top-k)")
            )

    def table(self) -> str:
        """The candidates (and, with the stop words measured, their shift)."""
        if self.stopwords is None:
            return self.candidates_table()
        return f"{self.candidates_table()}\n\n{self.stopwords.table()}\nsuper weights restored bitwise: yes"

    def plot(self, folder: str | Path) -> list[Path]:
        """stopwords.png where the stop words were measured (the candidates have no figure)."""
        if self.stopwords is None:
            return []
        from .plots import plot_stopwords

        return [plot_stopwords(self.stopwords, Path(folder) / "stopwords.png")]

    def candidates_table(self) -> str:
        lines = [f"Super weights: {self.model} ({len(self.input_ids)} tokens)", f"  rule: {self.rule}"]
        if self.prefix is not None:
            lines.append(f"  input: {self.prefix.describe()} + the text")
        if not self.candidates:
            lines.append("  no candidate")
            lines += [f"  warning: {w}" for w in self.warnings]
            return "\n".join(lines)
        checked = self.located is not None
        lines.append(
            f"  {'layer':>5} {'row':>6} {'col':>6} {'weight':>9} {'in spike':>10} {'out spike':>11} "
            f"{'pos':>4} {'share':>6}  {'kind':<7}" + ("  col = massive row" if checked else "")
        )
        for c in self.candidates:
            rank = ""
            if checked:
                rank = "  " + (
                    f"rank {c.massive_row_rank}" + (" (top-1)" if c.massive_row_rank == 1 else "")
                    if c.massive_row_rank
                    else "no"
                )
            lines.append(
                f"  {c.layer:5d} {c.row:6d} {c.col:6d} {c.weight:9.4f} {c.input_spike:10,.1f} {c.output_spike:11,.1f} "
                f"{c.position:4d} {c.share:6.2f}  {'creates' if c.creates else 'dampens':<7}{rank}"
            )
        if checked:
            lines.append(
                f"  locator: massive layer {self.located['layer']}, rows {self.located['indices']}"
                + (f" ({self.located['probe']})" if self.located.get("probe") else "")
            )
        if self.published is not None:
            lines.append(f"  published: {self.published['message']}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(line.rstrip() for line in lines)


def _argmax2(t: torch.Tensor) -> tuple[float, int, int]:
    """max |t| of a [T, D] tensor and its (position, index)."""
    flat = t.abs().flatten()
    i = int(flat.argmax())
    return float(flat[i]), *divmod(i, t.shape[1])


def _weight_at(block: FFNBlock, row: int, col: int) -> float:
    target = block.down_target([col])  # axis: the weight dimension that indexes intermediate units
    w = target.weight.detach()
    return float(w[row, col] if target.axis == 1 else w[col, row])


def find_super_weights(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    blocks: Optional[Sequence[FFNBlock]] = None,
    threshold: Optional[float] = None,
    top: int = 3,
) -> SuperWeightReport:
    """Candidate super weights from one forward pass of ``input_ids`` (1 x T); see the module rule."""
    blocks = [
        b for b in (blocks if blocks is not None else find_ffn_blocks(model)) if getattr(b, "down", None) is not None
    ]
    ids = as_batch(model, input_ids)
    rec: dict[int, dict[str, Any]] = {b.index: {} for b in blocks}

    def down_pre(i):
        def hook(module, args):
            rec[i]["inter"] = per_position(args[0]).float()

        return hook

    def down_post(i):
        def hook(module, args, output):
            out = per_position(first_tensor(output)).float()
            r = rec[i]
            r["in_spike"], r["in_pos"], r["col"] = _argmax2(r["inter"])
            r["out_spike"], r["out_pos"], r["row"] = _argmax2(out)
            r["out_value"] = float(out[r["out_pos"], r["row"]])
            r["unit"] = float(r.pop("inter")[r["out_pos"], r["col"]])  # the column's input at the spike

        return hook

    def layer_pre(i):
        def hook(module, args, kwargs):
            r = rec[i]
            r["h_in"] = per_position(args[0] if args else kwargs["hidden_states"])

        return hook

    def layer_post(i):
        def hook(module, args, output):
            r = rec[i]
            h_in = r.pop("h_in")
            if "row" in r:
                pos, row = r["out_pos"], r["row"]
                h_out = per_position(first_tensor(output))
                r["res_in"], r["res_out"] = float(h_in[pos, row].abs()), float(h_out[pos, row].abs())

        return hook

    def register():
        handles = []
        for b in blocks:
            handles += [
                b.layer.register_forward_pre_hook(layer_pre(b.index), with_kwargs=True),
                b.layer.register_forward_hook(layer_post(b.index)),
                b.down.register_forward_pre_hook(down_pre(b.index)),
                b.down.register_forward_hook(down_post(b.index)),
            ]
        return handles

    forward_with_hooks(model, ids, register)
    missing = [b.index for b in blocks if "res_in" not in rec[b.index]]
    if missing:
        raise RuntimeError(f"the forward pass did not reach the down projection of layers {missing}")

    spikes = {
        b.index: DownSpikes(
            b.index,
            r["in_spike"],
            r["in_pos"],
            r["col"],
            r["out_spike"],
            r["out_pos"],
            r["row"],
            r["res_in"],
            r["res_out"],
        )
        for b, r in ((b, rec[b.index]) for b in blocks)
    }
    largest = max((s.output_spike for s in spikes.values()), default=0.0)
    cutoff = threshold if threshold is not None else RELATIVE * largest
    kept = [
        s for s in spikes.values() if (s.output_spike > cutoff if threshold is not None else s.output_spike >= cutoff)
    ]
    kept.sort(key=lambda s: (not s.creates, -s.output_spike))

    names = {id(m): n for n, m in unwrap_peft(model).named_modules()}
    by_index = {b.index: b for b in blocks}
    candidates = []
    for s in kept[:top]:
        block, r = by_index[s.layer], rec[s.layer]
        weight = _weight_at(block, s.row, s.col)
        candidates.append(
            SuperWeight(
                layer=s.layer,
                row=s.row,
                col=s.col,
                weight=weight,
                input_spike=s.input_spike,
                output_spike=s.output_spike,
                position=s.output_position,
                share=r["unit"] * weight / r["out_value"] if r["out_value"] else 0.0,
                creates=s.creates,
                module=names.get(id(base_layer(block.down)), "") + ".weight",
            )
        )
    return SuperWeightReport(
        model=model_name(model),
        input_ids=ids[0].tolist(),
        threshold=threshold,
        candidates=candidates,
        layers=[spikes[b.index] for b in blocks],
    )


# ----------------------------------------------------------------------------- command line
