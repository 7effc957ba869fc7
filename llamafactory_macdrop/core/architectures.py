"""Where the FFN of each decoder layer lives, found by structure rather than by model name.

A decoder stack is the longest ``nn.ModuleList`` whose every element holds an FFN that one of
the layouts below recognises (layers of different kinds may mix, e.g. Qwen-MoE's dense layers).
Adapter wrappers (peft's LoRA/DoRA layers) are seen through with ``get_base_layer()``, so the
weights returned are always the frozen pre-trained ones.

Layouts (``FFN_LAYOUTS``), tried in order:

=================  ========================================  ===============================
layout             modules                                   models
=================  ========================================  ===============================
moe                ``mlp.gate`` (router) + ``mlp.experts``   Mixtral, Qwen2-MoE, Qwen3-MoE
                   (3-D ``gate_up_proj`` / ``down_proj``)
gated              ``mlp.{gate,up,down}_proj``               Llama, Mistral, Qwen2/3, OLMo,
                                                             OLMo2, Gemma-2/3, SmolLM, ...
fused_gate_up      ``mlp.gate_up_proj`` (gate half, then     Phi-3
                   up half) + ``mlp.down_proj``
conv1d             ``mlp.c_fc`` / ``mlp.c_proj`` (Conv1D,    GPT-2
                   weights stored [in, out])
fc                 ``fc1`` / ``fc2`` on the layer itself     OPT
neox               ``mlp.dense_h_to_4h`` / ``dense_4h_to_h``  GPT-NeoX, Pythia
=================  ========================================  ===============================

For every layout a block knows (1) how to capture the intermediate state act(gate(x)) * up(x)
(or act(up(x)) without a gate) at the probe token, (2) which rows of which weights produce
intermediate unit i, and (3) the down-projection weight, with the axis that indexes units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import MacDropError
from .probing import first_position, unwrap_peft
from .storage import RowTarget, logical_shape, row_target


class UnsupportedArchitectureError(MacDropError, ValueError):
    """The model has no FFN layout this package recognises."""


def base_layer(module: nn.Module) -> nn.Module:
    """The pre-trained layer under an adapter wrapper (or the module itself)."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): weight [in, out], y = x @ W + b
    return type(base_layer(module)).__name__ == "Conv1D"


@dataclass
class FFNBlock:
    """The FFN of one decoder layer: how to probe it and which weights hold its rows.

    Subclasses implement the layouts; everything outside this module uses only this interface.
    """

    index: int  # 0-based layer index (HF module index)
    layer: nn.Module  # the decoder layer: its input/output is the residual stream
    prefix: str  # parameter-name prefix of the FFN, e.g. "model.layers.11.mlp."
    layout: str = field(default="", init=False)
    layer_prefix: str = field(default="", init=False)  # e.g. "model.layers.11."

    @property
    def intermediate_size(self) -> int:
        raise NotImplementedError

    @property
    def is_moe(self) -> bool:
        return False

    def probe_hooks(self, record: dict[str, Any]) -> list:
        """Register hooks that store |intermediate| at the probe token into ``record["inter"]``."""
        raise NotImplementedError

    def row_targets(self, rows, expert: Optional[int] = None, model: Optional[nn.Module] = None) -> list[RowTarget]:
        """The weight rows that produce intermediate units ``rows`` (what MacDrop masks), each
        edited by the storage backend :func:`~.storage.row_target` picks for its weight.
        ``model``: the model as the trainer runs it (needed under FSDP, see ``row_target``)."""
        raise NotImplementedError

    def down_target(self, rows, expert: Optional[int] = None) -> RowTarget:
        """The down projection's weight slices that READ intermediate units ``rows``."""
        raise NotImplementedError

    def module_names(self, expert: Optional[int] = None) -> list[str]:
        raise NotImplementedError


@dataclass
class DenseFFN(FFNBlock):
    """A dense FFN: up (optionally fused with gate, optionally Conv1D), optional gate, down."""

    up: nn.Module = None
    down: nn.Module = None
    gate: Optional[nn.Module] = None
    up_attr: str = ""
    gate_attr: Optional[str] = None
    fused_gate_up: bool = False

    def __post_init__(self) -> None:
        self.layout = "fused_gate_up" if self.fused_gate_up else ("conv1d" if _is_conv1d(self.up) else "dense")

    @property
    def _up_axis(self) -> int:
        return 1 if _is_conv1d(self.up) else 0

    @property
    def intermediate_size(self) -> int:
        n = logical_shape(base_layer(self.up).weight)[self._up_axis]
        return n // 2 if self.fused_gate_up else n

    def probe_hooks(self, record):
        def hook(module, args):
            record["inter"] = first_position(args[0]).detach().float().abs()

        return [self.down.register_forward_pre_hook(hook)]

    def row_targets(self, rows, expert=None, model=None):
        rows = torch.as_tensor(rows, dtype=torch.long)
        up = base_layer(self.up)
        up_w = getattr(up, "weight", None)
        if self.fused_gate_up:  # Phi-3: gate rows first, then up rows, in one matrix
            n = self.intermediate_size
            name = f"{self.prefix}{self.up_attr}.weight"
            return [
                row_target(f"{name}[gate]", up_w, rows, module=up, model=model),
                row_target(f"{name}[up]", up_w, rows + n, module=up, model=model),
            ]
        targets = [
            row_target(f"{self.prefix}{self.up_attr}.weight", up_w, rows, axis=self._up_axis, module=up, model=model)
        ]
        if self.gate is not None:
            gate = base_layer(self.gate)
            targets.insert(
                0,
                row_target(
                    f"{self.prefix}{self.gate_attr}.weight",
                    getattr(gate, "weight", None),
                    rows,
                    module=gate,
                    model=model,
                ),
            )
        return targets

    def down_target(self, rows, expert=None):
        down = base_layer(self.down)
        axis = 0 if _is_conv1d(self.down) else 1
        return row_target(
            "down", getattr(down, "weight", None), torch.as_tensor(rows, dtype=torch.long), axis=axis, module=down
        )

    def module_names(self, expert=None):
        names = [f"{self.prefix}{self.up_attr}.weight"]
        if self.gate is not None:
            names.insert(0, f"{self.prefix}{self.gate_attr}.weight")
        return names


@dataclass
class MoEFFN(FFNBlock):
    """A sparse MoE block (transformers 5 layout): router ``gate`` and fused 3-D ``experts``.

    The probe routes the BOS token like the model does (softmax over router logits) and looks at
    the expert with the highest probability; only that expert's rows are targeted.
    """

    container: nn.Module = None
    router: nn.Module = None
    experts: nn.Module = None

    def __post_init__(self) -> None:
        self.layout = "moe"

    @property
    def is_moe(self) -> bool:
        return True

    @property
    def num_experts(self) -> int:
        return logical_shape(self.experts.gate_up_proj)[0]

    @property
    def intermediate_size(self) -> int:
        return logical_shape(self.experts.gate_up_proj)[1] // 2

    def probe_hooks(self, record):
        """Three hooks, each reading weights where they are guaranteed to be materialised.

        Under DeepSpeed ZeRO-3 a module's own parameters are gathered only between its
        pre-forward and post-forward hooks (ZeRO's hooks were registered first, so they run
        before ours on the way in and before ours on the way out). So the router's weight is
        read in the ROUTER's forward pre-hook and the experts' weight in the EXPERTS' forward
        pre-hook, never in a hook of the enclosing MoE block, where both are released again.
        """
        act: Callable = self.experts.act_fn

        def block_pre(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            record["moe_input"] = first_position(x).detach().float()

        def router_pre(module, args, kwargs):
            x = record.get("moe_input")
            if x is None:
                return
            probs = torch.softmax(x @ self.router.weight.detach().float().t(), dim=-1)
            expert = int(probs.argmax())
            record["expert"], record["router_prob"] = expert, float(probs[expert])
            record["router_probs"] = probs.cpu()  # every expert's probability (locate's routing table)

        def experts_pre(module, args, kwargs):
            x, expert = record.pop("moe_input", None), record.get("expert")
            if x is None or expert is None:
                return
            gate, up = (x @ self.experts.gate_up_proj[expert].detach().float().t()).chunk(2, dim=-1)
            record["inter"] = (act(gate) * up).abs()

        return [
            self.container.register_forward_pre_hook(block_pre, with_kwargs=True),
            self.router.register_forward_pre_hook(router_pre, with_kwargs=True),
            self.experts.register_forward_pre_hook(experts_pre, with_kwargs=True),
        ]

    def _check(self, expert):
        if expert is None or not 0 <= expert < self.num_experts:
            raise ValueError(f"layer {self.index} is a MoE layer: an expert in 0..{self.num_experts - 1} is needed")

    def row_targets(self, rows, expert=None, model=None):
        self._check(expert)
        rows = torch.as_tensor(rows, dtype=torch.long)
        w = self.experts.gate_up_proj
        name = f"{self.prefix}experts.gate_up_proj[{expert}]"
        return [
            row_target(f"{name}[gate]", w, rows, expert=expert, module=self.experts, model=model),
            row_target(
                f"{name}[up]", w, rows + self.intermediate_size, expert=expert, module=self.experts, model=model
            ),
        ]

    def down_target(self, rows, expert=None):
        self._check(expert)
        return row_target(
            "down",
            self.experts.down_proj,
            torch.as_tensor(rows, dtype=torch.long),
            axis=1,
            expert=expert,
            module=self.experts,
        )

    def module_names(self, expert=None):
        return [f"{self.prefix}experts.gate_up_proj"]


# ----------------------------------------------------------------------------- discovery
def _weighted(module) -> bool:
    return module is not None and hasattr(base_layer(module), "weight")


def _ndim(weight) -> int:
    """Number of dimensions of a weight's REAL shape: a ZeRO-3 partitioned parameter is 1-D
    (``.dim()`` is 1, its shape [0]) while ``ds_shape`` holds the real one."""
    return len(logical_shape(weight)) if isinstance(weight, torch.Tensor) else 0


def _match_moe(index, layer, prefix):
    mlp = getattr(layer, "mlp", None)
    router, experts = getattr(mlp, "gate", None), getattr(mlp, "experts", None)
    if (
        router is not None
        and experts is not None
        and _ndim(getattr(router, "weight", None)) == 2
        and _ndim(getattr(experts, "gate_up_proj", None)) == 3
        and hasattr(experts, "act_fn")
    ):
        return MoEFFN(index, layer, f"{prefix}mlp.", container=mlp, router=router, experts=experts)
    return None


def _dense_matcher(container: str, up: str, down: str, gate: Optional[str] = None, fused: bool = False):
    def match(index, layer, prefix):
        ffn = getattr(layer, container, None) if container else layer
        if ffn is None:
            return None
        up_m, down_m = getattr(ffn, up, None), getattr(ffn, down, None)
        gate_m = getattr(ffn, gate, None) if gate else None
        if not (_weighted(up_m) and _weighted(down_m)) or (gate and not _weighted(gate_m)):
            return None
        return DenseFFN(
            index,
            layer,
            f"{prefix}{container + '.' if container else ''}",
            up=up_m,
            down=down_m,
            gate=gate_m,
            up_attr=up,
            gate_attr=gate,
            fused_gate_up=fused,
        )

    return match


FFN_LAYOUTS: tuple[tuple[str, Callable], ...] = (
    ("mlp.gate (router) + mlp.experts", _match_moe),
    ("mlp.{gate,up,down}_proj", _dense_matcher("mlp", "up_proj", "down_proj", gate="gate_proj")),
    ("mlp.{gate_up,down}_proj", _dense_matcher("mlp", "gate_up_proj", "down_proj", fused=True)),
    ("mlp.{c_fc,c_proj}", _dense_matcher("mlp", "c_fc", "c_proj")),
    ("{fc1,fc2}", _dense_matcher("", "fc1", "fc2")),
    ("mlp.{dense_h_to_4h,dense_4h_to_h}", _dense_matcher("mlp", "dense_h_to_4h", "dense_4h_to_h")),
)


def _match_layer(index: int, layer: nn.Module, prefix: str) -> Optional[FFNBlock]:
    for _, match in FFN_LAYOUTS:
        block = match(index, layer, prefix)
        if block is not None:
            block.layer_prefix = prefix  # parameter-name prefix of the whole decoder layer
            return block
    return None


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
        kinds = "; ".join(name for name, _ in FFN_LAYOUTS)
        raise UnsupportedArchitectureError(
            f"{type(root).__name__}: found no decoder layers with a recognised FFN (looked for {kinds})"
        )
    return best
