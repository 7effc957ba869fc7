"""Massive activations (Sun et al. 2024) per layer, from one forward pass over a short text.

Why: the locator looks at the BOS token alone and names the layer whose FFN *creates* the
massive activation. This report shows the whole picture that rule relies on, over every
position of a real input: for each decoder layer, the largest and the median |value| of

* the residual hidden state leaving the layer (the output of the decoder layer), and
* the FFN intermediate state act(gate(x)) * up(x) (the input of the down projection),

and lists the massive activations by Sun et al.'s criterion (their code): entries of the
layer-output hidden state with ``|a| > abs_threshold`` (100) AND ``|a| > median_ratio`` (1000)
times the median |value| of that layer's hidden state (all positions and dimensions). They sit
in a few fixed dimensions at the first token and ride the residual stream from the layer that
creates them on: the first layer with massive entries is reported as ``origin_layer``, and the
|intermediate| vector there (at the position of its largest massive entry) is kept for plots.

SmolLM2-135M-Instruct (an English sentence, as its tokenizer encodes it: no BOS): dim 507 at position 0 is massive in the
outputs of layers 11-27 (~24,900 against medians of 2-10); layers 28-29 write it back down
(10,231 < 1000 x median 11.2), so it is no longer massive by the criterion there.

MoE layers have no single down projection module: their intermediate statistics are ``None``.
The forward runs in eval mode without gradients and with adapters disabled (a PeftModel is
seen as its pre-trained base); the training flag is restored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ...core.architectures import FFNBlock, find_ffn_blocks
from ...core.probing import (
    JsonReport,
    as_batch,
    first_tensor,
    forward_with_hooks,
    model_name,
    per_position,
)
from ...core.text_prefix import TextPrefix, resolve_prefix


def _top(t: torch.Tensor, k: int) -> tuple[list[float], list[list[int]]]:
    """Largest ``k`` |values| of a [T, D] tensor and their [position, index]."""
    flat = t.abs().flatten()
    top = flat.topk(min(k, flat.numel()))
    at = [list(divmod(int(i), t.shape[1])) for i in top.indices]
    return [float(v) for v in top.values], at


# ----------------------------------------------------------------------------- report
@dataclass
class MassiveActivation:
    """One massive entry of a layer's output hidden state (``value`` keeps its sign)."""

    layer: int
    position: int
    dim: int
    value: float


@dataclass
class LayerActivations:
    """One decoder layer over all positions; ``*_top`` are |values|, largest first, with
    their [position, index] in ``*_top_at``."""

    layer: int
    hidden_top: list[float]
    hidden_top_at: list[list[int]]
    hidden_median: float
    intermediate_top: Optional[list[float]] = None
    intermediate_top_at: Optional[list[list[int]]] = None
    intermediate_median: Optional[float] = None
    massive: list[MassiveActivation] = field(default_factory=list)

    @property
    def massive_dims(self) -> list[int]:
        return sorted({m.dim for m in self.massive})

    @property
    def massive_positions(self) -> list[int]:
        return sorted({m.position for m in self.massive})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["massive_dims"], out["massive_positions"] = self.massive_dims, self.massive_positions
        return out


@dataclass
class ActivationReport(JsonReport):
    """Per-layer activation magnitudes and Sun et al.'s massive activations for one input."""

    schema = "macdrop.activations/1"

    model: str
    input_ids: list[int]
    abs_threshold: float
    median_ratio: float
    layers: list[LayerActivations]
    tokens: Optional[list[str]] = None
    #: |intermediate| at the origin layer, at the position of its largest massive entry (plots)
    origin_intermediate: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    prefix: Optional[TextPrefix] = None  # what was put before the text (set by the caller)
    cross_check: Optional[dict[str, Any]] = None  # the other detectors' layers (analysis/inspect/cross_check.py)
    warnings: list[str] = field(default_factory=list)

    @property
    def massive(self) -> list[MassiveActivation]:
        return [m for layer in self.layers for m in layer.massive]

    @property
    def massive_layers(self) -> list[int]:
        return [layer.layer for layer in self.layers if layer.massive]

    @property
    def origin_layer(self) -> Optional[int]:
        """The first layer whose output holds massive activations (None if there are none)."""
        layers = self.massive_layers
        return layers[0] if layers else None

    def payload(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_ids": self.input_ids,
            "tokens": self.tokens,
            "criterion": f"|a| > {self.abs_threshold:g} and |a| > {self.median_ratio:g} x median|h| of the layer output",
            "abs_threshold": self.abs_threshold,
            "median_ratio": self.median_ratio,
            "origin_layer": self.origin_layer,
            "massive_layers": self.massive_layers,
            "massive_dims": sorted({m.dim for m in self.massive}),
            "layers": [layer.to_dict() for layer in self.layers],
            **({"prefix": self.prefix.protocol()} if self.prefix is not None else {}),
            **({"cross_check": self.cross_check} if self.cross_check is not None else {}),
            "warnings": list(self.warnings),
        }

    def plot(self, folder: str | Path) -> list[Path]:
        """activations_layers.png (the layer profile) and activations_intermediate.png (the origin layer's bars)."""
        from .plots import plot_intermediate_bars, plot_layer_profile

        folder = Path(folder)
        out = [plot_layer_profile(self, folder / "activations_layers.png")]
        if self.origin_intermediate is not None:
            values = self.origin_intermediate
            top = values.topk(min(5, values.numel())).indices.tolist()
            out.append(plot_intermediate_bars(values, top, folder / "activations_intermediate.png", self.origin_layer))
        return out

    def table(self) -> str:
        """One line per layer: hidden top-1/2/3 and median, intermediate top-1 and median, #massive."""
        lines = [
            f"Activations: {self.model} ({len(self.input_ids)} tokens); massive = |a| > {self.abs_threshold:g}"
            f" and > {self.median_ratio:g} x median",
            *([f"  input: {self.prefix.describe()} + the text"] if self.prefix is not None else []),
            f"  {'layer':>5}  {'hidden top1':>11} {'top2':>9} {'top3':>9} {'median':>8}"
            f"  {'inter top1':>10} {'median':>8}  {'massive':>7}",
        ]
        for s in self.layers:
            h = s.hidden_top + [float("nan")] * (3 - len(s.hidden_top))
            it = (
                f"{s.intermediate_top[0]:10,.1f} {s.intermediate_median:8.3f}"
                if s.intermediate_top
                else f"{'-':>10} {'-':>8}"
            )
            where = f"  dims {s.massive_dims} pos {s.massive_positions}" if s.massive else ""
            lines.append(
                f"  {s.layer:5d}  {h[0]:11,.1f} {h[1]:9,.1f} {h[2]:9,.1f} {s.hidden_median:8.3f}  {it}  {len(s.massive):7d}{where}"
            )
        origin = self.origin_layer
        lines.append(
            f"  origin of the massive activations: layer {origin}"
            if origin is not None
            else "  no massive activations by this criterion"
        )
        if self.cross_check is not None:
            located = self.cross_check.get("locator_layer")
            verdict = "agree" if located == origin else "DISAGREE"
            lines.append(f"  locator's massive layer: {located} ({self.cross_check.get('locator_probe')}): {verdict}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def activation_report(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    blocks: Optional[Sequence[FFNBlock]] = None,
    abs_threshold: float = 100.0,
    median_ratio: float = 1000.0,
    *,
    tokenizer: Any = None,
) -> ActivationReport:
    """Run ``input_ids`` (1 x T) once and summarise every layer in ``blocks`` (default: all).

    Statistics are reduced inside the hooks, so memory stays at one layer's activations whatever
    the depth of the model.
    """
    blocks = list(blocks) if blocks is not None else find_ffn_blocks(model)
    ids = as_batch(model, input_ids)
    inter: dict[int, torch.Tensor] = {}
    layers: dict[int, LayerActivations] = {}
    origin: dict[str, torch.Tensor] = {}

    def down_hook(i):
        def hook(module, args):
            inter[i] = per_position(args[0]).float().abs()

        return hook

    def layer_hook(i):
        def hook(module, args, output):
            h = per_position(first_tensor(output)).float()
            mag = h.abs()
            median = float(mag.median())
            top, top_at = _top(mag, 3)
            hits = ((mag > abs_threshold) & (mag > median_ratio * median)).nonzero().tolist()
            massive = [MassiveActivation(i, p, d, float(h[p, d])) for p, d in hits]
            stats = LayerActivations(i, top, top_at, median, massive=massive)
            u = inter.pop(i, None)
            if u is not None:
                stats.intermediate_top, stats.intermediate_top_at = _top(u, 3)
                stats.intermediate_median = float(u.median())
                if massive and "row" not in origin:
                    peak = max(massive, key=lambda m: abs(m.value))
                    origin["row"] = u[peak.position].cpu()
            layers[i] = stats

        return hook

    def register():
        handles = []
        for b in blocks:
            down = getattr(b, "down", None)
            if down is not None:
                handles.append(down.register_forward_pre_hook(down_hook(b.index)))
            handles.append(b.layer.register_forward_hook(layer_hook(b.index)))
        return handles

    forward_with_hooks(model, ids, register)
    missing = [b.index for b in blocks if b.index not in layers]
    if missing:
        raise RuntimeError(f"the forward pass did not reach layers {missing}")
    id_list = ids[0].tolist()
    return ActivationReport(
        model=model_name(model),
        input_ids=id_list,
        abs_threshold=abs_threshold,
        median_ratio=median_ratio,
        layers=[layers[b.index] for b in blocks],
        tokens=tokenizer.convert_ids_to_tokens(id_list) if tokenizer is not None else None,
        origin_intermediate=origin.get("row"),
    )


# ----------------------------------------------------------------------------- probe input
def probe_input_ids(tokenizer: Any, text: str, prefix: Optional[TextPrefix] = None) -> torch.Tensor:
    """``prefix`` + the tokens of ``text`` without special tokens, as 1 x T.

    ``prefix`` defaults to what the tokenizer itself puts before a text (core/text_prefix.py):
    the first token is where massive activations live, so the probe starts with the token the
    model is really fed first, not a config id its tokenizer never adds.
    """
    if prefix is None:
        prefix = resolve_prefix(tokenizer)
    ids = prefix.apply(tokenizer(text, add_special_tokens=False)["input_ids"] if text else [])
    if not ids:
        raise ValueError("the probe input is empty: give a --text")
    return torch.tensor([ids], dtype=torch.long)
