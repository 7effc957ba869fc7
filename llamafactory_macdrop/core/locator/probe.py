"""The probe: one token alone at position 0 through the model, recording every layer at that token;
and which tokens to probe (what the model really sees first, then BOS/EOS)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..architectures import FFNBlock
from ..model_config import read_config_json
from ..probing import StopForward, as_batch, first_position, first_tensor, forward_with_hooks, unwrap_peft
from .result import LayerStats, LocatorError, ProbeToken, RouterProbs


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
    found = (
        read_config_json(folder) if folder and Path(folder).is_dir() else None
    )  # the loaded folder's, not a cache copy
    if found is not None:
        saved = found[1]
        views += [saved, saved.get("text_config") or {}]
    if config is not None:
        text_config = getattr(config, "get_text_config", lambda: None)()
        views += [
            {a: getattr(c, a, None) for a in ("bos_token_id", "eos_token_id")}
            for c in (config, text_config)
            if c is not None
        ]
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
        if (
            cand.token_id in [c.token_id for c in out]
            or cand.token_id < 0
            or (vocab is not None and cand.token_id >= vocab)
        ):
            continue
        out.append(
            ProbeToken(
                cand.token_id, cand.source, cand.text if cand.text is not None else token_text(tokenizer, cand.token_id)
            )
        )
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
