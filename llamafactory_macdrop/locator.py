"""Find the massive layer and its top-k massive weights with one BOS-token forward pass.

The rule (docs/locator.md): feed the probe token (BOS) alone at position 0 and record, for every
decoder layer l, the largest |value| of the residual stream entering the layer (``in_max``) and
leaving it (``out_max``) and the intermediate state act(gate(x)) * up(x) of its FFN.

* The massive layer is the layer where the massive activation ORIGINATES: the layer with the
  largest jump ``out_max / in_max``. Once created, the massive activation rides the residual
  stream through all later layers, so no later layer can show a comparable jump; early layers
  often have intermediate spikes ~1000x their median (SmolLM2-135M: layers 1-2) and late layers
  can have large intermediate spikes near the output (SmolLM2-135M: layer 28), but neither
  multiplies the residual stream's maximum the way the origin does (SmolLM2-135M layer 11:
  29 -> 24,926, a jump of ~850x).
* The top-k massive weights are the rows of W_up/W_gate at that layer whose intermediate units
  have the largest |value|, largest first.
* ``massiveness`` is the jump at the origin; below :data:`CLEAR_JUMP` the model has no clear
  massive activation (the paper finds none in Gemma-2) and a warning is attached.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .architectures import FFNBlock, find_ffn_blocks
from .probing import JsonReport, StopForward, as_batch, first_position, first_tensor, forward_with_hooks, model_name, unwrap_peft

LOCATOR_FILE = "macdrop_locator.json"
CLEAR_JUMP = 10.0
RULE = "origin = argmax_l max|h_out_l| / max|h_in_l| at the probe token; indices = top-k |intermediate| there"


class LocatorError(ValueError):
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


@dataclass
class LocatorResult(JsonReport):
    """Where the massive weights are; serialised as ``macdrop_locator.json``."""

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
    rule: str = RULE
    layers: list[LayerStats] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: |intermediate| at the chosen layer (for plots); not written to JSON
    intermediate: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    @property
    def paper_layer(self) -> int:
        """The layer counted from 1, as the paper's tables do."""
        return self.layer + 1

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("intermediate")
        out["paper_layer"] = self.paper_layer
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LocatorResult":
        data = {k: v for k, v in data.items() if k != "paper_layer"}
        data["layers"] = [LayerStats(**s) for s in data.get("layers", [])]
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
        if self.massiveness is not None:
            lines.append(
                f"  residual jump at that layer: {self.massiveness:,.1f}x   probe token id: {self.probe_token_id}"
                f" ({self.probe_token_source})"
            )
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
            + " | " + ", ".join(map(str, self.indices))
        )
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


# ----------------------------------------------------------------------------- probing
def origin_passed(in_abs: torch.Tensor, out_abs: torch.Tensor, min_jump: float = 100.0, abs_threshold: float = 100.0) -> bool:
    """Whether this layer just created a massive activation: its residual max grew >= ``min_jump``
    times to more than ``abs_threshold``. Later layers cannot out-jump it (the massive value then
    rides the residual stream), so a layer-by-layer probe may stop here."""
    top, before = float(out_abs.max()), float(in_abs.max())
    return top > abs_threshold and top >= min_jump * before


def probe_ffn_states(
    model: nn.Module,
    blocks: Sequence[FFNBlock],
    token_id: int,
    stop_after: Optional[Callable[[FFNBlock, torch.Tensor, torch.Tensor], bool]] = None,
) -> tuple[list[LayerStats], list[torch.Tensor], dict[int, tuple[int, float]]]:
    """One forward pass of ``token_id`` alone; per-layer stats and |intermediate| vectors.

    Runs with adapters disabled (a PeftModel is probed as its pre-trained base) and in eval
    mode; the model's training flag is restored afterwards. ``stop_after(block, |in|, |out|)``
    may end the pass early (layer-by-layer loading stops once the origin is behind it); the
    result then covers the layers seen so far.
    """
    records: dict[int, dict[str, torch.Tensor]] = {b.index: {} for b in blocks}
    by_index = {b.index: b for b in blocks}

    def pre_layer(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            records[i]["in"] = first_position(hidden).detach().float().abs()
        return hook

    def post_layer(i):
        def hook(module, args, output):
            records[i]["out"] = first_position(first_tensor(output)).detach().float().abs()
            if stop_after is not None and stop_after(by_index[i], records[i]["in"], records[i]["out"]):
                raise StopForward
        return hook

    def register():
        handles = []
        for b in blocks:
            handles.append(b.layer.register_forward_pre_hook(pre_layer(b.index), with_kwargs=True))
            handles.append(b.layer.register_forward_hook(post_layer(b.index)))
            handles.extend(b.probe_hooks(records[b.index]))
        return handles

    forward_with_hooks(model, as_batch(model, [token_id]), register)

    stats, inters, experts = [], [], {}
    for b in blocks:
        r = records[b.index]
        if stop_after is not None and not r:
            break  # stopped early: the layers after this one were not run
        if not {"in", "out", "inter"} <= r.keys():
            raise LocatorError(f"layer {b.index}: the probe forward did not reach this layer's FFN")
        in_max, out_max = float(r["in"].max()), float(r["out"].max())
        top = r["inter"].max(dim=0)
        stats.append(
            LayerStats(
                layer=b.index,
                in_max=in_max,
                out_max=out_max,
                jump=out_max / in_max if in_max > 0 else math.inf,
                intermediate_top1=float(top.values),
                intermediate_top1_index=int(top.indices),
                intermediate_median=float(r["inter"].median()),
            )
        )
        inters.append(r["inter"].cpu())
        if "expert" in r:
            experts[b.index] = (r["expert"], r["router_prob"])
    return stats, inters, experts


def resolve_probe_token(model: nn.Module, tokenizer: Any = None, override: int | str | None = None) -> tuple[int, str]:
    """The probe token id and where it came from.

    Policy (docs/locator.md): an explicit override (an id, or a text whose FIRST token is used);
    else BOS from the model config, then from the tokenizer; else, for models trained without
    BOS (GPT-style, documents separated by EOS), the EOS token, which is what starts a document
    there. Without any of these the caller must give the token or the layer and indices.
    """
    if isinstance(override, bool):
        raise LocatorError(f"probe token {override!r}: give a token id or a text")
    if isinstance(override, int):
        vocab = getattr(getattr(unwrap_peft(model), "config", None), "vocab_size", None)
        if override < 0 or (vocab is not None and override >= vocab):
            raise LocatorError(f"probe token id {override} is outside the vocabulary (0..{vocab - 1})")
        return override, "override"
    if isinstance(override, str):
        if tokenizer is None:
            raise LocatorError(f"probe token text {override!r} needs the model's tokenizer")
        ids = tokenizer(override, add_special_tokens=False)["input_ids"]
        if not ids:
            raise LocatorError(f"probe token text {override!r} tokenizes to nothing")
        return int(ids[0]), f"override: first token of {override!r}"
    config = getattr(unwrap_peft(model), "config", None)
    text_config = getattr(config, "get_text_config", lambda: None)() if config is not None else None
    for attr in ("bos_token_id", "eos_token_id"):
        for name, source in (("config", config), ("config", text_config), ("tokenizer", tokenizer)):
            token = getattr(source, attr, None) if source is not None else None
            if isinstance(token, (list, tuple)) and token:
                token = token[0]
            if isinstance(token, int):
                return token, f"{name}.{attr}"
    raise LocatorError(
        "the model has neither a BOS nor an EOS token: give macdrop_probe_token (or --probe-token), "
        "or macdrop_layer and macdrop_indices"
    )


def locate_massive_weights(
    model: nn.Module,
    k: int = 5,
    *,
    probe_token: int | str | None = None,
    tokenizer: Any = None,
    layer: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
    blocks: Optional[Sequence[FFNBlock]] = None,
    stop_after: Optional[Callable[[FFNBlock, torch.Tensor, torch.Tensor], bool]] = None,
) -> LocatorResult:
    """Locate the massive layer and top-k rows; ``layer``/``indices`` override the probe.

    With both overrides given nothing is run (useful when a forward pass is expensive), unless
    the layer is a MoE layer, whose expert only the probe can name; with one override, the probe
    supplies the other.
    """
    blocks = list(blocks) if blocks is not None else find_ffn_blocks(model)
    by_index = {b.index: b for b in blocks}
    if layer is not None and layer not in by_index:
        raise LocatorError(f"macdrop_layer={layer} is out of range: the model has layers 0..{len(blocks) - 1}")
    if indices is not None and layer is not None:
        _check_indices(indices, by_index[layer])

    warnings: list[str] = []
    expert = router_prob = None
    if layer is not None and indices is not None and not by_index[layer].is_moe:
        chosen, idx = layer, [int(i) for i in indices]
        mags = median = massiveness = None
        stats: list[LayerStats] = []
        token, token_source = (probe_token, "override") if isinstance(probe_token, int) else (None, None)
        source = "override"
    else:
        token, token_source = resolve_probe_token(model, tokenizer, probe_token)
        stats, inters, experts = probe_ffn_states(model, blocks, token, stop_after=stop_after)
        origin = max(range(len(stats)), key=lambda i: stats[i].jump)
        chosen = layer if layer is not None else stats[origin].layer
        if chosen not in [s.layer for s in stats]:
            raise LocatorError(f"macdrop_layer={chosen} lies beyond the layers probed (0..{stats[-1].layer})")
        if indices is not None:  # checked against the layer actually used (the located one)
            _check_indices(indices, by_index[chosen])
        pos = [s.layer for s in stats].index(chosen)
        inter = inters[pos]
        if k > inter.numel():
            raise LocatorError(f"macdrop_k={k} exceeds the intermediate size {inter.numel()} of layer {chosen}")
        idx = [int(i) for i in indices] if indices is not None else inter.topk(k).indices.tolist()
        mags = [float(inter[i]) for i in idx]
        median = float(inter.median())
        massiveness = stats[pos].jump
        expert, router_prob = experts.get(chosen, (None, None))
        source = "probe" if layer is None and indices is None else "probe+override"
        if stats[origin].jump < CLEAR_JUMP:
            warnings.append(
                f"no clear massive activation: the largest residual jump is {stats[origin].jump:.1f}x "
                f"(layer {stats[origin].layer}); MacDrop may not help this model"
            )
    block = by_index[chosen]
    return LocatorResult(
        model=model_name(model),
        layer=chosen,
        indices=idx,
        magnitudes=mags,
        median=median,
        probe_token_id=token,
        modules=block.module_names(expert),
        massiveness=massiveness,
        source=source,
        expert=expert,
        router_prob=router_prob,
        probe_token_source=token_source,
        layers=stats,
        warnings=warnings,
        intermediate=None if source == "override" else inter,
    )


def _check_indices(indices: Sequence[int], block: FFNBlock) -> None:
    size = block.intermediate_size
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise LocatorError(
            f"macdrop_indices={list(indices)}: {bad} outside 0..{size - 1} (intermediate size {size} of layer {block.index})"
        )


def reuse_result(
    path: str | Path,
    model: nn.Module,
    blocks: Sequence[FFNBlock],
    k: int,
    layer: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
) -> LocatorResult:
    """Read a resumed run's ``macdrop_locator.json`` and check it belongs to this model and config.

    A resumed run must drop the rows the interrupted run dropped; re-deriving them could differ
    (other probe token, other dtype), so the file is authoritative, and a file written for another
    model, or contradicting macdrop_k/macdrop_layer/macdrop_indices, is refused.
    """
    result = LocatorResult.from_dict(json.loads(Path(path).read_text()))
    name = model_name(model)
    fix = f"delete {path} to locate again"
    if result.model != name:
        raise LocatorError(f"{path} was written for model {result.model!r}, this run trains {name!r}: {fix}")
    by_index = {b.index: b for b in blocks}
    block = by_index.get(result.layer)
    if block is None or block.module_names(result.expert) != result.modules:
        raise LocatorError(f"{path} names weights {result.modules} that this model does not have at layer {result.layer}: {fix}")
    if max(result.indices) >= block.intermediate_size:
        raise LocatorError(f"{path}: indices {result.indices} exceed the intermediate size {block.intermediate_size}: {fix}")
    for key, wanted, found in (
        ("macdrop_k", k, len(result.indices)),
        ("macdrop_layer", layer, result.layer),
        ("macdrop_indices", list(indices) if indices is not None else None, result.indices),
    ):
        if wanted is not None and wanted != found:
            raise LocatorError(f"{key}={wanted} contradicts {path} ({found}) of the run being resumed: {fix}")
    return result
