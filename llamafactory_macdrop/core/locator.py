"""Find the massive layer and its top-k massive weights with single-token forward passes.

The rule (docs/locator.md): feed a probe token alone at position 0 and record, for every decoder
layer l, the residual stream entering the layer (``in_max``) and leaving it (``out_max``,
``out_median``) and the intermediate state act(gate(x)) * up(x) of its FFN, all at that token.

* A layer is the ORIGIN of the massive activation when the residual stream there *becomes
  massive and stays so* (:func:`find_origin`): its max leaving the layer is above
  :data:`MASSIVE_ABS` (Sun et al.'s |a| > 100) and at least :data:`MEDIAN_RATIO` times the median
  of the same vector, it was created there (at least :data:`MIN_JUMP` times the max entering the
  layer), and the next :data:`PERSIST_LAYERS` layers keep at least :data:`KEEP_FRACTION` of it.
  The FIRST such layer wins, so a layer-by-layer reader may stop :data:`PERSIST_LAYERS` layers
  after it with the same answer. A jump alone is fooled by tiny embeddings (0.05 -> 4 is an 80x
  jump of nothing); a threshold alone is fooled by early spikes that fade (SmolLM2-135M: 769 at
  layer 2, created with a 2.6x jump, gone by layer 9; the origin is layer 11, 29 -> 24,926).
* The top-k massive weights are the rows of W_up/W_gate at that layer whose intermediate units
  have the largest |value|, largest first.
* Which token (:func:`probe_candidates`): what the model really sees first (the first training
  batch's position-0 token, or what the chat template / tokenizer puts first), then BOS/EOS.
  Each candidate is probed; the first one that produces a massive activation is used. When none
  does, a warning says so and the largest residual jump of the first candidate stands in.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .architectures import FFNBlock, find_ffn_blocks
from .model_config import read_config_json
from .probing import (
    JsonReport,
    StopForward,
    as_batch,
    first_position,
    first_tensor,
    forward_with_hooks,
    model_name,
    unwrap_peft,
)

LOCATOR_FILE = "macdrop_locator.json"
MASSIVE_ABS = 100.0  # Sun et al.: a massive activation has |a| > 100 ...
MEDIAN_RATIO = 100.0  # ... far above the median (theirs: 1000x over a whole sequence; here one token)
MIN_JUMP = 50.0  # created at this layer, not carried in: out_max >= MIN_JUMP x in_max
PERSIST_LAYERS = 2  # ... and kept by this many following layers
KEEP_FRACTION = 0.5  # ... at no less than this fraction of its value
RULE = (
    f"origin = first layer whose residual max at the probe token exceeds {MASSIVE_ABS:g} and "
    f"{MEDIAN_RATIO:g}x its median, after a >= {MIN_JUMP:g}x jump, and keeps >= {KEEP_FRACTION:g} of it "
    f"for {PERSIST_LAYERS} layers; probe = the first candidate token that has one; "
    "indices = top-k |intermediate| there"
)


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

    def to_dict(self) -> dict[str, Any]:
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
            + " | " + ", ".join(map(str, self.indices))
        )
        if self.candidates:
            lines.append("  candidate first tokens: token  origin  residual max (layer)  source")
            for c in self.candidates:
                text = f" {c.text!r}" if c.text is not None else ""
                origin = str(c.origin_layer) if c.origin_layer is not None else "none"
                lines.append(f"    {c.token_id}{text}  {origin}  {c.residual_max:,.1f} (layer {c.residual_max_layer})  {c.source}")
        lines.extend(self.routing_table())
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def routing_table(self) -> list[str]:
        """MoE: one line per probed MoE layer, the router probability of every expert for the probe token."""
        if not self.routing:
            return []
        n = len(self.routing[0].probs)
        lines = ["  router probabilities of the probe token (softmax over experts, before top-k):",
                 "    layer  " + " ".join(f"{'e' + str(e):>6}" for e in range(n)) + "   top"]
        for r in self.routing:
            mark = "  <- massive layer" if r.layer == self.layer else ""
            lines.append(f"    {r.layer:5d}  " + " ".join(f"{p:6.3f}" for p in r.probs) + f"   e{r.top_expert}{mark}")
        return lines


# ----------------------------------------------------------------------------- the rule
def is_massive(stat: LayerStats) -> bool:
    """The residual stream leaving this layer holds a massive activation at the probe token."""
    median = stat.out_median if stat.out_median is not None else 0.0
    return stat.out_max > MASSIVE_ABS and stat.out_max >= MEDIAN_RATIO * median


def find_origin(stats: Sequence[LayerStats], last_layer: int) -> Optional[int]:
    """Position in ``stats`` of the origin layer, or None.

    The origin is the FIRST layer that is massive (:func:`is_massive`), created there (jump >=
    :data:`MIN_JUMP`) and kept by the next :data:`PERSIST_LAYERS` layers (>= :data:`KEEP_FRACTION`
    of its max; fewer when the model ends first). ``stats`` may stop early (layer by layer): a
    layer whose window is not complete yet is undecided and None is returned, so the answer never
    depends on layers beyond origin + PERSIST_LAYERS and an early stop gives the full answer.
    """
    for i, s in enumerate(stats):
        if not (is_massive(s) and s.jump >= MIN_JUMP):
            continue
        window = stats[i + 1: i + 1 + PERSIST_LAYERS]
        if len(window) < PERSIST_LAYERS and stats[-1].layer != last_layer:
            return None  # undecided until more layers are seen
        if all(w.out_max >= KEEP_FRACTION * s.out_max for w in window):
            return i
    return None


# ----------------------------------------------------------------------------- probing
def probe_ffn_states(
    model: nn.Module,
    blocks: Sequence[FFNBlock],
    token_id: int,
    stop_after: Optional[Callable[[list[LayerStats]], bool]] = None,
    routing: Optional[list[RouterProbs]] = None,
) -> tuple[list[LayerStats], list[torch.Tensor], dict[int, tuple[int, float]]]:
    """One forward pass of ``token_id`` alone; per-layer stats and |intermediate| vectors.

    Runs with adapters disabled (a PeftModel is probed as its pre-trained base) and in eval
    mode; the model's training flag is restored afterwards. ``stop_after(stats so far)`` is asked
    after every layer and may end the pass (layer-by-layer loading stops once the rule has
    decided); the result then covers the layers seen so far. ``routing``, when given, receives
    the router's probabilities over all experts at every MoE layer (:class:`RouterProbs`).
    """
    routing = routing if routing is not None else []
    records: dict[int, dict[str, torch.Tensor]] = {b.index: {} for b in blocks}
    stats: list[LayerStats] = []
    inters: list[torch.Tensor] = []
    experts: dict[int, tuple[int, float]] = {}

    def pre_layer(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            records[i]["in"] = first_position(hidden).detach().float().abs()
        return hook

    def post_layer(i):
        def hook(module, args, output):
            r = records[i]
            r["out"] = first_position(first_tensor(output)).detach().float().abs()
            if not {"in", "out", "inter"} <= r.keys():
                raise LocatorError(f"layer {i}: the probe forward did not reach this layer's FFN")
            in_max, out_max = float(r["in"].max()), float(r["out"].max())
            top = r["inter"].max(dim=0)
            stats.append(
                LayerStats(
                    layer=i,
                    in_max=in_max,
                    out_max=out_max,
                    jump=out_max / in_max if in_max > 0 else math.inf,
                    intermediate_top1=float(top.values),
                    intermediate_top1_index=int(top.indices),
                    intermediate_median=float(r["inter"].median()),
                    out_median=float(r["out"].median()),
                    out_top_dim=int(r["out"].argmax()),
                )
            )
            inters.append(r["inter"].cpu())
            if "expert" in r:
                experts[i] = (r["expert"], r["router_prob"])
            if "router_probs" in r:
                routing.append(RouterProbs(i, [float(p) for p in r["router_probs"]], r["expert"], r["router_prob"]))
            if stop_after is not None and stop_after(stats):
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
    if not stats:
        raise LocatorError("the probe forward reached no decoder layer")
    return stats, inters, experts


# ----------------------------------------------------------------------------- which token
def token_text(tokenizer: Any, token_id: int) -> Optional[str]:
    """How the tokenizer writes ``token_id`` (None without a tokenizer)."""
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode([int(token_id)])
    except Exception:  # noqa: BLE001 - a broken vocabulary entry must not stop locating
        return None


def _config_token_ids(model: nn.Module) -> list[ProbeToken]:
    """BOS then EOS as the CHECKPOINT's config names them, then as the live config does.

    The checkpoint's ``config.json`` comes first because transformers' ``Trainer.train`` rewrites
    ``model.config.bos_token_id``/``eos_token_id`` to the tokenizer's (``align_special_tokens``):
    a Qwen-style model whose tokenizer has no BOS loses its config BOS there, so the training run
    and ``macdrop locate`` would otherwise see different configs (docs/locator.md).
    """
    config = getattr(unwrap_peft(model), "config", None)
    views: list[Any] = []
    folder = str(getattr(config, "_name_or_path", "") or "")
    found = read_config_json(folder) if folder and Path(folder).is_dir() else None  # the loaded folder's, not a cache copy
    if found is not None:
        saved = found[1]
        views += [saved, saved.get("text_config") or {}]
    if config is not None:
        text_config = getattr(config, "get_text_config", lambda: None)()
        views += [{a: getattr(c, a, None) for a in ("bos_token_id", "eos_token_id")} for c in (config, text_config) if c is not None]
    out = []
    for attr in ("bos_token_id", "eos_token_id"):
        for view in views:
            token = view.get(attr)
            if isinstance(token, (list, tuple)) and token:
                token = token[0]
            if isinstance(token, int) and not isinstance(token, bool):
                out.append(ProbeToken(token, f"config.{attr}"))
    return out


def _vocab_size(model: nn.Module) -> Optional[int]:
    emb = getattr(unwrap_peft(model), "get_input_embeddings", lambda: None)()
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    return getattr(getattr(unwrap_peft(model), "config", None), "vocab_size", None)


def probe_candidates(
    model: nn.Module,
    tokenizer: Any = None,
    override: int | str | None = None,
    first_token: Optional[ProbeToken] = None,
) -> list[ProbeToken]:
    """The tokens to probe, in order of preference (docs/locator.md, "Which token").

    An explicit override (an id, or a text whose FIRST token is used) is the only candidate.
    Else: ``first_token`` (what the model really sees first: the first training batch's position-0
    token, or what the chat template / tokenizer puts first), then the tokenizer's BOS and EOS,
    then the config's BOS and EOS (models trained without BOS start a document after an EOS).
    Duplicates are dropped; without any candidate the caller must give the token or the layer
    and indices.
    """
    vocab = _vocab_size(model)
    if isinstance(override, bool):
        raise LocatorError(f"probe token {override!r}: give a token id or a text")
    if isinstance(override, int):
        if override < 0 or (vocab is not None and override >= vocab):
            raise LocatorError(f"probe token id {override} is outside the vocabulary (0..{vocab - 1})")
        return [ProbeToken(override, "override", token_text(tokenizer, override))]
    if isinstance(override, str):
        if tokenizer is None:
            raise LocatorError(f"probe token text {override!r} needs the model's tokenizer")
        ids = tokenizer(override, add_special_tokens=False)["input_ids"]
        if not ids:
            raise LocatorError(f"probe token text {override!r} tokenizes to nothing")
        return [ProbeToken(int(ids[0]), f"override: first token of {override!r}", token_text(tokenizer, int(ids[0])))]
    found = [first_token] if first_token is not None else []
    for attr in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(token, int) and not isinstance(token, bool):
            found.append(ProbeToken(token, f"tokenizer.{attr}"))
    found += _config_token_ids(model)
    out: list[ProbeToken] = []
    for cand in found:
        if cand.token_id in [c.token_id for c in out] or cand.token_id < 0 or (vocab is not None and cand.token_id >= vocab):
            continue
        out.append(ProbeToken(cand.token_id, cand.source, cand.text if cand.text is not None else token_text(tokenizer, cand.token_id)))
    if not out:
        raise LocatorError(
            "the model has neither a BOS nor an EOS token: give macdrop_probe_token (or --probe-token), "
            "or macdrop_layer and macdrop_indices"
        )
    return out


def resolve_probe_token(model: nn.Module, tokenizer: Any = None, override: int | str | None = None) -> tuple[int, str]:
    """The first candidate's id and source (:func:`probe_candidates` without a first token)."""
    first = probe_candidates(model, tokenizer, override)[0]
    return first.token_id, first.source


def _describe(token: ProbeToken) -> str:
    text = f" {token.text!r}" if token.text is not None else ""
    return f"{token.token_id}{text} ({token.source})"


def _no_massive_warning(candidates: Sequence[CandidateResult], fallback: LayerStats) -> str:
    tried = ", ".join(f"{c.token_id}{' ' + repr(c.text) if c.text is not None else ''} (max {c.residual_max:,.1f})"
                      for c in candidates)
    return (
        f"no massive activation: for none of the probed first tokens [{tried}] does the residual stream "
        f"become massive (> {MASSIVE_ABS:g} and >= {MEDIAN_RATIO:g}x its median after a >= {MIN_JUMP:g}x jump, "
        f"kept for {PERSIST_LAYERS} layers); falling back to the largest residual jump, layer {fallback.layer} "
        f"({fallback.jump:,.1f}x, {fallback.in_max:,.2f} -> {fallback.out_max:,.2f}), whose rows are NOT massive weights. "
        "MacDrop may not help this model (the paper finds none in Gemma-2): train without macdrop, or give "
        "macdrop_probe_token / --probe-token (the token your sequences start with), or macdrop_layer and macdrop_indices"
    )


def locate_massive_weights(
    model: nn.Module,
    k: int = 5,
    *,
    probe_token: int | str | None = None,
    tokenizer: Any = None,
    first_token: Optional[ProbeToken] = None,
    layer: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
    blocks: Optional[Sequence[FFNBlock]] = None,
    stop_early: bool = False,
) -> LocatorResult:
    """Locate the massive layer and top-k rows; ``layer``/``indices`` override the probe.

    With both overrides given nothing is run (useful when a forward pass is expensive), unless
    the layer is a MoE layer, whose expert only the probe can name; with one override, the probe
    supplies the other (with an explicit layer only the first candidate token is probed, up to
    that layer). ``first_token``: what the model really sees first (see :func:`probe_candidates`).
    ``stop_early`` (layer by layer): end each probe once :func:`find_origin` has decided, and stop
    trying candidates at the first one with a massive activation; the answer is the same.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LocatorError(f"macdrop_k={k!r} is not allowed: expected an integer >= 1")
    blocks = list(blocks) if blocks is not None else find_ffn_blocks(model)
    by_index = {b.index: b for b in blocks}
    last = blocks[-1].index
    if layer is not None and layer not in by_index:
        raise LocatorError(f"macdrop_layer={layer} is out of range: the model has layers 0..{len(blocks) - 1}")
    if indices is not None and layer is not None:
        _check_indices(indices, by_index[layer])

    warnings: list[str] = []
    routing: list[RouterProbs] = []
    expert = router_prob = None
    inter = None
    candidates: list[CandidateResult] = []
    massive: Optional[bool] = None
    if layer is not None and indices is not None and not by_index[layer].is_moe:
        chosen, idx = layer, [int(i) for i in indices]
        mags = median = massiveness = None
        stats: list[LayerStats] = []
        token = ProbeToken(probe_token, "override", token_text(tokenizer, probe_token)) if isinstance(probe_token, int) else None
        source = "override"
    else:
        tokens = probe_candidates(model, tokenizer, probe_token, first_token)
        if layer is not None:
            tokens = tokens[:1]

        def stop_after(seen: list[LayerStats]) -> bool:
            # only layer by layer: a full load (ZeRO-3, FSDP included) runs its forward to the end
            if not stop_early:
                return False
            if seen[-1].layer == last:
                return True  # the head is not loaded
            if layer is not None:
                return seen[-1].layer >= layer
            return find_origin(seen, last) is not None

        probes = []
        routes_of: dict[int, list[RouterProbs]] = {}
        for tok in tokens:
            routes: list[RouterProbs] = []
            stats, inters, experts = probe_ffn_states(model, blocks, tok.token_id, stop_after=stop_after, routing=routes)
            origin = find_origin(stats, last) if layer is None else None
            top = max(stats, key=lambda s: s.out_max)
            candidates.append(CandidateResult(tok.token_id, tok.text, tok.source, None if origin is None else stats[origin].layer,
                                              top.out_max, top.layer, len(stats)))
            probes.append((tok, stats, inters, experts, origin))
            routes_of[id(stats)] = routes
            if stop_early and origin is not None:
                break
        with_origin = [p for p in probes if p[4] is not None]
        token, stats, inters, experts, origin = with_origin[0] if with_origin else probes[0]
        if layer is not None:
            pos = [s.layer for s in stats].index(layer)
        elif origin is not None:
            pos, massive = origin, True
            if token is not tokens[0]:
                warnings.append(
                    f"the first candidate token {_describe(tokens[0])} shows no massive activation; located with "
                    f"{_describe(token)}, which does (see candidates). If your training sequences start with the "
                    "first one, these rows may matter less than the paper assumes"
                )
        else:
            pos, massive = max(range(len(stats)), key=lambda i: stats[i].jump), False
            warnings.append(_no_massive_warning(candidates, stats[pos]))
        chosen = stats[pos].layer
        if indices is not None:  # checked against the layer actually used (the located one)
            _check_indices(indices, by_index[chosen])
        inter = inters[pos]
        if k > inter.numel():
            raise LocatorError(f"macdrop_k={k} exceeds the intermediate size {inter.numel()} of layer {chosen}")
        idx = [int(i) for i in indices] if indices is not None else inter.topk(k).indices.tolist()
        mags = [float(inter[i]) for i in idx]
        median = float(inter.median())
        massiveness = stats[pos].jump
        expert, router_prob = experts.get(chosen, (None, None))
        routing = routes_of[id(stats)]
        source = "probe" if layer is None and indices is None else "probe+override"
    block = by_index[chosen]
    return LocatorResult(
        model=model_name(model),
        layer=chosen,
        indices=idx,
        magnitudes=mags,
        median=median,
        probe_token_id=token.token_id if token is not None else None,
        modules=block.module_names(expert),
        massiveness=massiveness,
        source=source,
        expert=expert,
        router_prob=router_prob,
        probe_token_source=token.source if token is not None else None,
        probe_token_text=token.text if token is not None else None,
        massive=massive,
        layers=stats,
        candidates=candidates,
        warnings=warnings,
        routing=routing,
        intermediate=inter,
    )


def _check_indices(indices: Sequence[int], block: FFNBlock) -> None:
    size = block.intermediate_size
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise LocatorError(
            f"macdrop_indices={list(indices)}: {bad} outside 0..{size - 1} (intermediate size {size} of layer {block.index})"
        )


#: what every locator file must hold, and of which JSON type (the rest is optional: older files lack it)
_LOCATOR_REQUIRED = {"model": str, "layer": int, "indices": list, "modules": list, "source": str}
_LOCATOR_OPTIONAL = {"magnitudes": list, "median": (int, float), "probe_token_id": int, "massiveness": (int, float),
                     "layers": list, "candidates": list, "warnings": list, "routing": list}


def read_locator_file(path: str | Path) -> LocatorResult:
    """The :class:`LocatorResult` in a ``macdrop_locator.json`` (a run's, or ``macdrop locate --json``'s).

    The one reader of the file (``macdrop summary`` and a resumed run): anything that is not such a
    file (unreadable, not UTF-8, not JSON, truncated, not an object, keys missing or of the wrong
    type) is a :class:`LocatorError` in one line naming the file and what is wrong."""
    def bad(why: str) -> LocatorError:
        return LocatorError(f"{path} is not a MacDrop locator file: {why}")

    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise LocatorError(f"{path} cannot be read ({err.strerror or type(err).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        ending = "; the file is empty" if not text.strip() else "; it looks cut short" if err.pos >= len(text.rstrip()) else ""
        raise bad(f"not valid JSON ({err}{ending})") from None
    if not isinstance(data, dict):
        raise bad(f"it holds a JSON {_json_kind(data)}, not an object with the located layer and rows")
    missing = [k for k in _LOCATOR_REQUIRED if k not in data]
    if missing:
        raise bad("it has no " + ", ".join(f"'{k}'" for k in missing))
    for key, kind in {**_LOCATOR_REQUIRED, **_LOCATOR_OPTIONAL}.items():
        value = data.get(key)
        if key in _LOCATOR_OPTIONAL and value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            wanted = _json_kind(kind() if isinstance(kind, type) else 0)
            raise bad(f"'{key}' is a JSON {_json_kind(value)}, expected {'an' if wanted[0] in 'ao' else 'a'} {wanted}")
    if not data["indices"] or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in data["indices"]):
        raise bad(f"'indices' is {data['indices']!r}, expected a non-empty list of row indices >= 0")
    data = {k: v for k, v in data.items() if not (k in ("layers", "candidates", "warnings", "routing") and v is None)}
    data = {**data, **{k: None for k in ("magnitudes", "median", "probe_token_id", "massiveness") if k not in data}}
    try:
        return LocatorResult.from_dict(data)
    except (TypeError, ValueError, AttributeError) as err:  # a nested entry (layers, candidates, ...) of another shape
        raise bad(f"an entry of 'layers', 'candidates' or 'routing' is not in this version's format ({err})") from None


def read_resumed_locator_file(path: str | Path) -> LocatorResult:
    """:func:`read_locator_file` for a resumed run, whose errors end with the way out."""
    try:
        return read_locator_file(path)
    except LocatorError as err:
        raise LocatorError(f"{err}: delete {path} to locate again") from None


def _json_kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


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
    fix = f"delete {path} to locate again"
    result = read_resumed_locator_file(path)
    name = model_name(model)
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
