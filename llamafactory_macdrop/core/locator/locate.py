"""``locate_massive_weights``: probe the candidate tokens, apply the origin rule, rank the rows."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from ..architectures import FFNBlock, find_ffn_blocks
from ..probing import model_name
from .probe import _describe, probe_candidates, probe_ffn_states, token_text
from .result import CandidateResult, LayerStats, LocatorError, LocatorResult, ProbeToken, RouterProbs
from .rule import MASSIVE_ABS, MEDIAN_RATIO, MIN_JUMP, PERSIST_LAYERS, find_origin


def _no_massive_warning(candidates: Sequence[CandidateResult], fallback: LayerStats) -> str:
    tried = ", ".join(
        f"{c.token_id}{' ' + repr(c.text) if c.text is not None else ''} (max {c.residual_max:,.1f})"
        for c in candidates
    )
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
        token = (
            ProbeToken(probe_token, "override", token_text(tokenizer, probe_token))
            if isinstance(probe_token, int)
            else None
        )
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
            stats, inters, experts = probe_ffn_states(
                model, blocks, tok.token_id, stop_after=stop_after, routing=routes
            )
            origin = find_origin(stats, last) if layer is None else None
            top = max(stats, key=lambda s: s.out_max)
            candidates.append(
                CandidateResult(
                    tok.token_id,
                    tok.text,
                    tok.source,
                    None if origin is None else stats[origin].layer,
                    top.out_max,
                    top.layer,
                    len(stats),
                )
            )
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
