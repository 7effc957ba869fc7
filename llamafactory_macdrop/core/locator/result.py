"""What the locator answers: the result, its per-layer statistics and candidates, its table and
JSON (``macdrop_locator.json``, unchanged across versions but for added optional keys)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import torch

from ...errors import MacDropError
from ..probing import JsonReport
from .rule import RULE

LOCATOR_FILE = "macdrop_locator.json"


class LocatorError(MacDropError, ValueError):
    """The probe or an override cannot name valid massive weights."""


@dataclass
class LayerStats:
    """What the probe saw at one layer (all at the probe token)."""

    layer: int
    in_max: float
    out_max: float
    jump: float
    intermediate_top1: float
    intermediate_top1_index: int
    intermediate_median: float
    out_median: Optional[float] = None  # median |residual| leaving the layer (None in old files)
    out_top_dim: Optional[int] = None  # the residual dimension holding out_max


@dataclass
class ProbeToken:
    """A token to probe with and where it came from (docs/locator.md, "Which token")."""

    token_id: int
    source: str
    text: Optional[str] = None


@dataclass
class CandidateResult:
    """What one candidate first token gives (JSON ``candidates``)."""

    token_id: int
    text: Optional[str]
    source: str
    origin_layer: Optional[int]  # None: the residual stream never becomes massive for it
    residual_max: float  # largest residual max over the layers probed
    residual_max_layer: int
    layers_probed: int


@dataclass
class RouterProbs:
    """MoE: the router's softmax over experts for the probe token at one layer (JSON ``routing``).

    The probability before top-k selection (and before any renormalisation over the chosen
    experts): at the massive layer it collapses onto the expert that holds the massive weights
    (House of Cards, Fig. 5 on Mixtral)."""

    layer: int
    probs: list[float]
    top_expert: int
    top_prob: float


@dataclass
class LocatorResult(JsonReport):
    """Where the massive weights are; serialised as ``macdrop_locator.json``."""

    schema = "macdrop.locator/1"

    model: str
    layer: int  # 0-based HF module index
    indices: list[int]  # largest first
    magnitudes: Optional[list[float]]  # |intermediate| at indices (None when not probed)
    median: Optional[float]  # median |intermediate| at the layer
    probe_token_id: Optional[int]
    modules: list[str]  # checkpoint names of the weights whose rows are targeted
    massiveness: Optional[float]  # residual jump at the layer
    source: str  # "probe", "override", or "probe+override"
    expert: Optional[int] = None  # MoE: the expert the router sends the probe token to
    router_prob: Optional[float] = None  # MoE: its routing probability
    probe_token_source: Optional[str] = None  # where the probe token came from (docs/locator.md)
    probe_token_text: Optional[str] = None
    massive: Optional[bool] = None  # whether the layer passed the rule (False: fallback, see warnings)
    rule: str = RULE
    layers: list[LayerStats] = field(default_factory=list)
    candidates: list[CandidateResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    routing: list[RouterProbs] = field(default_factory=list)  # MoE layers probed (empty for dense models)
    #: |intermediate| at the chosen layer (for plots); not written to JSON
    intermediate: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    @property
    def paper_layer(self) -> int:
        """The layer counted from 1, as the paper's tables do."""
        return self.layer + 1

    def payload(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("intermediate")
        out["paper_layer"] = self.paper_layer
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LocatorResult":
        known = {f.name for f in fields(cls)}  # paper_layer is derived; `macdrop locate --json` adds
        data = {k: v for k, v in data.items() if k in known}  # cross_check / published

        data["layers"] = [LayerStats(**s) for s in data.get("layers", [])]
        data["candidates"] = [CandidateResult(**c) for c in data.get("candidates", [])]
        data["routing"] = [RouterProbs(**r) for r in data.get("routing", [])]
        return cls(**data)

    def table(self) -> str:
        """A short human-readable summary."""
        lines = [
            f"MacDrop locator: {self.model}",
            f"  massive layer: {self.layer} (0-based; paper layer {self.paper_layer}), source: {self.source}",
        ]
        if self.expert is not None:
            prob = f" (router probability {self.router_prob:.3f})" if self.router_prob is not None else ""
            lines.append(f"  MoE expert: {self.expert}{prob}")
        if self.probe_token_id is not None:
            text = f" {self.probe_token_text!r}" if self.probe_token_text is not None else ""
            lines.append(f"  probe token: {self.probe_token_id}{text} ({self.probe_token_source})")
        if self.massiveness is not None:
            stat = next((s for s in self.layers if s.layer == self.layer), None)
            scale = f", residual max {stat.in_max:,.1f} -> {stat.out_max:,.1f}" if stat is not None else ""
            lines.append(f"  residual jump at that layer: {self.massiveness:,.1f}x{scale}")
        lines.append("  rank  index  |intermediate|  x median")
        for rank, idx in enumerate(self.indices, 1):
            mag = self.magnitudes[rank - 1] if self.magnitudes else None
            ratio = mag / self.median if (mag is not None and self.median) else None
            mag_s = f"{mag:14,.2f}" if mag is not None else f"{'-':>14}"
            ratio_s = f"{ratio:9,.0f}" if ratio is not None else f"{'-':>9}"
            lines.append(f"  {rank:4d}  {idx:5d}  {mag_s}  {ratio_s}")
        lines.append("  weights: " + ", ".join(self.modules))
        lines.append(
            f"  paper-style: {self.model} | layer {self.paper_layer} (HF index {self.layer})"
            + (f" | expert {self.expert}" if self.expert is not None else "")
            + " | "
            + ", ".join(map(str, self.indices))
        )
        if self.candidates:
            lines.append("  candidate first tokens: token  origin  residual max (layer)  source")
            for c in self.candidates:
                text = f" {c.text!r}" if c.text is not None else ""
                origin = str(c.origin_layer) if c.origin_layer is not None else "none"
                lines.append(
                    f"    {c.token_id}{text}  {origin}  {c.residual_max:,.1f} (layer {c.residual_max_layer})  {c.source}"
                )
        lines.extend(self.routing_table())
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def routing_table(self) -> list[str]:
        """MoE: one line per probed MoE layer, the router probability of every expert for the probe token."""
        if not self.routing:
            return []
        n = len(self.routing[0].probs)
        lines = [
            "  router probabilities of the probe token (softmax over experts, before top-k):",
            "    layer  " + " ".join(f"{'e' + str(e):>6}" for e in range(n)) + "   top",
        ]
        for r in self.routing:
            mark = "  <- massive layer" if r.layer == self.layer else ""
            lines.append(f"    {r.layer:5d}  " + " ".join(f"{p:6.3f}" for p in r.probs) + f"   e{r.top_expert}{mark}")
        return lines
