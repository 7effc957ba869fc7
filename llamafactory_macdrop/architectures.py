"""Where the FFN of each decoder layer lives, found by structure rather than by model name.

A decoder stack is the longest ``nn.ModuleList`` whose every element holds an FFN that we
recognise. An FFN is recognised by its projections: a down projection (whose INPUT is the
intermediate state) plus an up projection and, for gated FFNs, a gate projection. Adapter
wrappers (peft's LoRA/DoRA layers) are seen through with ``get_base_layer()``, so the weights
returned are always the frozen pre-trained ones.

Supported here: the Llama family layout (``mlp.{gate,up,down}_proj``: Llama, Mistral, Qwen2/3,
OLMo, SmolLM, ...). The other layouts are listed in docs/architectures.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .masking import RowTarget

#: (ffn attribute, gate, up, down) name patterns, tried in order.
FFN_LAYOUTS = (("mlp", "gate_proj", "up_proj", "down_proj"),)


class UnsupportedArchitectureError(ValueError):
    """The model has no FFN layout this package recognises."""


def base_layer(module: nn.Module) -> nn.Module:
    """The pre-trained layer under an adapter wrapper (or the module itself)."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


@dataclass
class FFNBlock:
    """The FFN of one decoder layer: what to probe and which weights hold its rows."""

    index: int  # 0-based layer index (HF module index)
    layer: nn.Module  # the decoder layer (its input/output is the residual stream)
    down: nn.Module  # its input is the intermediate state act(gate(x)) * up(x)
    up: nn.Module
    gate: Optional[nn.Module]
    up_name: str  # parameter names as in the checkpoint, e.g. model.layers.11.mlp.up_proj.weight
    gate_name: Optional[str]

    @property
    def intermediate_size(self) -> int:
        return base_layer(self.up).weight.shape[0]

    def row_targets(self, rows: torch.Tensor | list[int]) -> list[RowTarget]:
        """Rows of W_up and W_gate that produce intermediate units ``rows``."""
        targets = [RowTarget(self.up_name, base_layer(self.up).weight, torch.as_tensor(rows))]
        if self.gate is not None:
            targets.insert(0, RowTarget(self.gate_name, base_layer(self.gate).weight, torch.as_tensor(rows)))
        return targets

    @property
    def module_names(self) -> list[str]:
        return [n for n in (self.gate_name, self.up_name) if n is not None]


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (LoRA layers stay in place inside it)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _checkpoint_name(prefix: str, module_name: str) -> str:
    # peft wraps LoRA targets in place, so the module path is unchanged; the pre-trained
    # weight is '<path>.weight' in the checkpoint, while in memory it is '<path>.base_layer.weight'.
    return f"{prefix}{module_name}.weight"


def find_ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """The FFN of every decoder layer, in order; raises if none is recognised."""
    root = unwrap_peft(model)
    best: list[FFNBlock] = []
    for list_name, module_list in root.named_modules():
        if not isinstance(module_list, nn.ModuleList) or len(module_list) <= len(best):
            continue
        blocks = []
        for i, layer in enumerate(module_list):
            block = _match_layer(i, layer, f"{list_name}.{i}.")
            if block is None:
                break
            blocks.append(block)
        else:
            if blocks:
                best = blocks
    if not best:
        kinds = ", ".join(f"{a}.{{{g},{u},{d}}}" for a, g, u, d in FFN_LAYOUTS)
        raise UnsupportedArchitectureError(
            f"{type(root).__name__}: found no decoder layers with a recognised FFN (looked for {kinds})"
        )
    return best


def _match_layer(index: int, layer: nn.Module, prefix: str) -> Optional[FFNBlock]:
    for ffn_attr, gate_attr, up_attr, down_attr in FFN_LAYOUTS:
        ffn = getattr(layer, ffn_attr, None)
        if ffn is None:
            continue
        up, down = getattr(ffn, up_attr, None), getattr(ffn, down_attr, None)
        gate = getattr(ffn, gate_attr, None)
        if up is None or down is None or not hasattr(base_layer(up), "weight"):
            continue
        base = f"{prefix}{ffn_attr}."
        return FFNBlock(
            index=index,
            layer=layer,
            down=down,
            up=up,
            gate=gate,
            up_name=_checkpoint_name(base, up_attr),
            gate_name=_checkpoint_name(base, gate_attr) if gate is not None else None,
        )
    return None
