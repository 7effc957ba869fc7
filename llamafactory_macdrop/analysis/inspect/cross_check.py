"""Do the three detectors agree on where the massive activation comes from?

Why: the locator (one token alone), Sun et al.'s massive-activation criterion (a whole text) and
Yu et al.'s super-weight rule (the same text) look at one phenomenon from three sides: the
massive intermediate unit of the origin layer (the locator's top-1 row) feeds the down
projection's column that holds the super weight, which writes the massive activation into the
residual stream from that layer on. When they name different layers, one of them was fed
something the model is not fed in use (most often a token at position 0 that its tokenizer
never puts there), so each command prints the others' answers next to its own and warns, naming
both, instead of letting a wrong probe pass silently.

``locate_as_cli`` is the locator as ``macdrop locate`` runs it by default (first candidate: what
the chat template or the tokenizer puts first; docs/locator.md), so the three commands compare
against the same answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ...core.architectures import FFNBlock, find_ffn_blocks
from ...core.first_token import template_first_token
from ...core.locator import LocatorResult, locate_massive_weights


def locate_as_cli(
    model: nn.Module,
    tokenizer: Any,
    k: int = 5,
    blocks: Optional[Sequence[FFNBlock]] = None,
    probe_token: int | str | None = None,
) -> LocatorResult:
    """The locator with ``macdrop locate``'s defaults (no template name: the tokenizer's own)."""
    first = template_first_token(tokenizer) if probe_token is None else None
    return locate_massive_weights(
        model, k, tokenizer=tokenizer, first_token=first, probe_token=probe_token, blocks=blocks
    )


def probe_label(located: LocatorResult) -> str:
    """ "probe 1 '<s>' (tokenizer prepends it)" for messages."""
    if located.probe_token_id is None:
        return "layer and rows given"
    text = f" {located.probe_token_text!r}" if located.probe_token_text is not None else ""
    return f"probe {located.probe_token_id}{text} ({located.probe_token_source})"


@dataclass
class LayerAgreement:
    """The origin layer as each detector sees it (None: that detector found nothing)."""

    locator_layer: Optional[int]
    locator_probe: str
    activations_layer: Optional[int]
    super_weight: Optional[tuple[int, int, int]]  # (layer, row, col) of the first candidate that creates
    text: str  # what the activation / super-weight detectors were fed

    def warnings(self) -> list[str]:
        out = []
        if self.locator_layer is None:
            return out
        if self.activations_layer is not None and self.activations_layer != self.locator_layer:
            out.append(
                f"the massive activations start at layer {self.activations_layer} on {self.text}, "
                f"the locator names layer {self.locator_layer} ({self.locator_probe})"
            )
        if self.super_weight is not None and self.super_weight[0] != self.locator_layer:
            out.append(
                f"the super weight {self.super_weight} on {self.text} is in layer {self.super_weight[0]}, "
                f"the locator names layer {self.locator_layer} ({self.locator_probe})"
            )
        return out

    def line(self) -> str:
        sw = f"super weight {self.super_weight}" if self.super_weight else "no super weight"
        act = (
            f"massive activations from layer {self.activations_layer}"
            if self.activations_layer is not None
            else "no massive activations"
        )
        verdict = "agree" if not self.warnings() else "DISAGREE"
        return f"cross-check on {self.text}: {act}, {sw}; locator layer {self.locator_layer}: {verdict}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["super_weight"] = list(self.super_weight) if self.super_weight else None
        out["agree"] = not self.warnings()
        return out


def cross_check(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    located: LocatorResult,
    text: str,
    blocks: Optional[Sequence[FFNBlock]] = None,
) -> LayerAgreement:
    """Run the activation and super-weight detectors on ``input_ids`` and compare with ``located``."""
    from .activations import activation_report
    from .superweight import find_super_weights

    blocks = list(blocks) if blocks is not None else find_ffn_blocks(model)
    activations = activation_report(model, input_ids, blocks)
    sw = find_super_weights(model, input_ids, blocks)
    first = next((c for c in sw.candidates if c.creates), None)
    return LayerAgreement(
        located.layer,
        probe_label(located),
        activations.origin_layer,
        (first.layer, first.row, first.col) if first else None,
        text,
    )
