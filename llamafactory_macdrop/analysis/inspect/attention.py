"""The attention side of massive activations: attention sinks and where the probe token stands.

Why: Sun et al. find that massive activations concentrate attention on their tokens (the
"attention sink"), and House of Cards shows it on the models MacDrop targets (Fig. 2, Fig. 13):
the sink starts right after the massive layer the locator names. This module measures both
views on one loaded model:

* **Attention per layer** at a probe text ("Summer is warm. Winter is cold.", as both papers
  use), fed as the tokenizer feeds it: what it puts first (BOS on a Llama tokenizer; nothing on
  SmolLM2's, whose first word then stands at position 0), the text after it. Attention probabilities are taken after the
  softmax (what transformers' eager attention returns with ``output_attentions``), averaged
  over heads (per head on request). For every layer: ``share[k]``, the attention key position
  k receives, averaged over the query positions q >= 1 (position 0 can only attend to itself,
  so it says nothing); the shares sum to 1. ``sink_share`` = ``share[0]``; ``top_key`` = the
  argmax of ``share``.
* **The position experiment** (House of Cards, Fig. 2): the probe token (the input's first
  token, or ``--probe-token``) at the start, in the middle, at the end of the text, and absent. For each placement and layer: the residual stream
  magnitude leaving the layer at the massive dimensions (max over them) per position, and the
  attention every key position receives. On SmolLM2-135M the first token carries the massive
  activation whatever it is, and the BOS token in the middle carries none.

The massive dimensions are those of the residual stream leaving the massive layer at the probe
token (position 0 of the probe text) by the locator's rule (|h| > ``MASSIVE_ABS`` and >=
``MEDIAN_RATIO`` x the median of that vector); the largest one when none passes.

Probabilities exist only under eager attention (SDPA and flash kernels never form them): a model
running another implementation is switched to ``eager`` for the analysis, the report says so
(``notes``), and the original implementation is put back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ...core.architectures import FFNBlock, find_ffn_blocks
from ...core.locator import MASSIVE_ABS, MEDIAN_RATIO, LocatorResult, ProbeToken, locate_massive_weights, token_text
from ...core.probing import JsonReport, as_batch, first_tensor, model_name, per_position, unwrap_peft
from ...core.text_prefix import TextPrefix, resolve_prefix
from ...errors import MacDropError

DEFAULT_TEXT = "Summer is warm. Winter is cold."
PLACEMENTS = ("start", "middle", "end", "absent")


class AttentionError(MacDropError, ValueError):
    """The model or the request cannot give attention probabilities."""


# ----------------------------------------------------------------------------- report
@dataclass
class HeadAttention:
    """One head of one layer: the share each key position receives (queries >= 1)."""

    head: int
    share: list[float]
    sink_share: float
    top_key: int


@dataclass
class LayerAttention:
    """Attention and residual stream of one decoder layer at the probe text."""

    layer: int
    sink_share: float  # head-averaged attention on position 0, averaged over queries >= 1
    top_key: int  # argmax of ``share``
    share: list[float]  # per key position: head-averaged attention, averaged over queries >= 1
    attention: list[list[float]]  # head-averaged probabilities, query x key
    residual_massive: list[float]  # per position: max |residual leaving the layer| at the massive dims
    heads: Optional[list[HeadAttention]] = None  # per head (``per_head``)


@dataclass
class PlacementRun:
    """The position experiment for one placement of the probe token."""

    placement: str  # start | middle | end | absent
    input_ids: list[int]
    tokens: Optional[list[str]]
    probe_position: Optional[int]  # None: absent
    residual_massive: list[list[float]]  # per layer, per position (max |h| at the massive dims)
    share: list[list[float]]  # per layer, per key position (as LayerAttention.share)
    attention_on_probe: list[Optional[float]]  # per layer: mean attention on the probe over the queries after it
    attention_at: list[list[float]] = field(default_factory=list)  # query x key at ``position_layer`` (figure)


@dataclass
class AttentionReport(JsonReport):
    """Attention sinks per layer and the position experiment for one model."""

    schema = "macdrop.attention/1"

    model: str
    text: str
    input_ids: list[int]
    tokens: Optional[list[str]]
    probe_token_id: int
    probe_token_text: Optional[str]
    probe_token_source: Optional[str]
    massive_layer: int  # the locator's (0-based)
    massive: Optional[bool]  # whether the locator's rule found a massive activation there
    massive_dims: list[int]
    attn_implementation: str  # what produced the probabilities (always eager)
    layers: list[LayerAttention]
    position_layer: int  # the layer the position figure shows
    placements: list[PlacementRun]
    num_heads: int
    notes: list[str] = field(default_factory=list)
    prefix: Optional[dict[str, Any]] = None  # what was put before the text (core/text_prefix.py)
    adapter: Optional[str] = None  # --adapter: measured with it (the massive layer located on the base)
    #: the layers of attention_heatmaps.png (``--heatmap-layers``; None: massive, massive + 1, last)
    heatmap_layers: Optional[list[int]] = field(default=None, repr=False)

    def layer(self, index: int) -> LayerAttention:
        return next(s for s in self.layers if s.layer == index)

    def payload(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("heatmap_layers")
        return out

    def default_heatmap_layers(self) -> list[int]:
        """The massive layer, the one after it (where the sink starts) and the last layer."""
        ids = [s.layer for s in self.layers]
        wanted = [self.massive_layer, self.massive_layer + 1, ids[-1]]
        return [layer for layer in dict.fromkeys(wanted) if layer in ids]

    def plot(self, folder: str | Path) -> list[Path]:
        """attention_heatmaps.png, attention_sink.png, attention_position.png."""
        from .attention_plots import plot_attention_heatmaps, plot_position, plot_sink_curve

        folder = Path(folder)
        layers = self.heatmap_layers or self.default_heatmap_layers()
        return [
            plot_attention_heatmaps(self, layers, folder / "attention_heatmaps.png"),
            plot_sink_curve(self, folder / "attention_sink.png"),
            plot_position(self, folder / "attention_position.png"),
        ]

    def table(self) -> str:
        """One line per layer: sink share, most-attended key, residual max at the massive dims at position 0."""
        probe = f"{self.probe_token_id}" + (f" {self.probe_token_text!r}" if self.probe_token_text is not None else "")
        lines = [
            f"Attention: {self.model}{' + adapter ' + self.adapter if self.adapter else ''}; probe token {probe} "
            f"({self.probe_token_source}) + {self.text!r} ({len(self.input_ids)} tokens), "
            f"{self.attn_implementation} attention, {self.num_heads} heads averaged",
            *([f"  input: {self.prefix['prefix_summary']}"] if self.prefix else []),
            f"  massive layer {self.massive_layer} (locator), massive dims {self.massive_dims}",
            *(f"  note: {n}" for n in self.notes),
            f"  {'layer':>5}  {'sink share':>10}  {'top key':<18}  {'|h| at massive dims, position 0':>31}",
        ]
        for s in self.layers:
            mark = "  <- massive layer" if s.layer == self.massive_layer else ""
            top = f"{s.top_key}" + (f" {self.tokens[s.top_key]!r}" if self.tokens else "")
            lines.append(f"  {s.layer:5d}  {s.sink_share:10.3f}  {top:<18}  {s.residual_massive[0]:31,.1f}{mark}")
        lines.append(
            f"  position experiment at layer {self.position_layer}: placement  probe position  "
            "|h| at the probe (max elsewhere)  attention on it"
        )
        for run in self.placements:
            i = [s.layer for s in self.layers].index(self.position_layer)
            res = run.residual_massive[i]
            if run.probe_position is None:
                lines.append(
                    f"    {run.placement:<7}  {'-':>5}  position 0 (the first token): {res[0]:,.1f}, "
                    f"attention {run.share[i][0]:.3f}"
                )
                continue
            p = run.probe_position
            others = max((v for j, v in enumerate(res) if j != p), default=float("nan"))
            on = run.attention_on_probe[i]
            lines.append(
                f"    {run.placement:<7}  {p:5d}  {res[p]:,.1f} ({others:,.1f})  "
                + (f"{on:.3f}" if on is not None else "- (last position)")
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- measuring
def _attn_config(model: nn.Module):
    return getattr(unwrap_peft(model), "config", None)


@contextmanager
def eager_attention(model: nn.Module, notes: list[str]) -> Iterator[str]:
    """Run the block under eager attention (the only kind that forms probabilities); a model on
    another implementation is switched, ``notes`` gets a line saying so, and it is switched back."""
    root = unwrap_peft(model)
    before = getattr(_attn_config(model), "_attn_implementation", None) or "eager"
    switched = before != "eager"
    if switched:
        setter = getattr(root, "set_attn_implementation", None)
        if callable(setter):
            setter("eager")
        now = getattr(_attn_config(model), "_attn_implementation", None)
        if now != "eager":
            raise AttentionError(
                f"{type(root).__name__} runs {before} attention, which gives no attention probabilities, and cannot be "
                "switched to eager attention in place: load it with attn_implementation='eager'"
            )
        notes.append(
            f"the model runs {before} attention, which forms no probabilities: switched to eager attention "
            f"for this analysis (switched back to {before} afterwards)"
        )
    try:
        yield "eager"
    finally:
        if switched:
            root.set_attn_implementation(before)


@torch.no_grad()
def attention_pass(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    blocks: Sequence[FFNBlock],
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One eval no-grad forward: per layer the attention probabilities [heads, T, T] (float32, CPU)
    and |residual| leaving the layer [T, D]. The model must run eager attention (see
    :func:`eager_attention`). ``progress(done, total)`` is called after every layer."""
    ids = as_batch(model, input_ids)
    residual: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(module, args, output):
            residual[i] = per_position(first_tensor(output)).float().abs().cpu()
            if progress is not None:
                progress(len(residual), len(blocks))

        return record

    handles = [b.layer.register_forward_hook(hook(b.index)) for b in blocks]
    was_training = model.training
    try:
        model.eval()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    attentions = [a for a in (getattr(out, "attentions", None) or ()) if a is not None]
    if len(attentions) != len(blocks):
        raise AttentionError(
            f"the forward pass returned attention probabilities for {len(attentions)} of {len(blocks)} layers "
            f"(attn_implementation {getattr(_attn_config(model), '_attn_implementation', '?')}): eager attention is needed"
        )
    return [a[0].float().cpu() for a in attentions], [residual[b.index] for b in blocks]


def key_share(probs: torch.Tensor) -> torch.Tensor:
    """[..., T, T] query x key probabilities -> [..., T]: attention each key receives, averaged over queries >= 1."""
    if probs.shape[-2] < 2:
        return probs[..., 0, :]
    return probs[..., 1:, :].mean(dim=-2)


def massive_dims(residual_at_probe: torch.Tensor) -> list[int]:
    """The massive dimensions of one residual vector (locator's rule), or its largest one."""
    mag = residual_at_probe.abs()
    median = float(mag.median())
    dims = ((mag > MASSIVE_ABS) & (mag >= MEDIAN_RATIO * median)).nonzero().flatten()
    order = mag[dims].argsort(descending=True)
    return [int(d) for d in dims[order]] or [int(mag.argmax())]


def _placements(probe: int, words: Sequence[int]) -> dict[str, tuple[list[int], Optional[int]]]:
    mid = len(words) // 2
    return {
        "start": ([probe, *words], 0),
        "middle": ([*words[:mid], probe, *words[mid:]], mid),
        "end": ([*words, probe], len(words)),
        "absent": (list(words), None),
    }


def attention_report(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    text: str | Sequence[int] = DEFAULT_TEXT,
    located: Optional[LocatorResult] = None,
    probe_token: int | str | None = None,
    prefix: Optional[TextPrefix] = None,
    per_head: bool = False,
    position_layer: Optional[int] = None,
    blocks: Optional[Sequence[FFNBlock]] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> AttentionReport:
    """Locate (unless ``located`` is given), then the attention and position measurements above.

    The input is what the model is fed: ``prefix`` (default: what the tokenizer itself puts
    first, core/text_prefix.py) + the tokens of ``text``, and the probe token of the position
    experiment is its first token. ``probe_token`` (an id, or a text whose first token is used)
    puts that token first instead. ``text`` as a list of ids without a tokenizer: the ids follow
    the locator's probe token (its candidates, docs/locator.md). ``position_layer``: the layer of
    the position figure (default: the layer after the massive one with the largest sink share).
    ``progress(what, done, total)`` reports layers as they finish (4 passes: the input, then the
    middle/end/absent placements).
    """
    blocks = list(blocks) if blocks is not None else find_ffn_blocks(model)
    if isinstance(text, str):
        if tokenizer is None:
            raise AttentionError("a probe text needs the model's tokenizer (or give token ids)")
        words = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        shown = text
    else:
        words, shown = [int(t) for t in text], " ".join(map(str, text))
    if not words:
        raise AttentionError("the probe text is empty: give a text of at least one token")
    layer_ids = [b.index for b in blocks]
    if position_layer is not None and position_layer not in layer_ids:
        raise AttentionError(
            f"--position-layer {position_layer} is out of range: the model has layers 0..{layer_ids[-1]}"
        )
    notes: list[str] = []
    fed_first = None
    if located is None and probe_token is None and (tokenizer is not None or prefix is not None):
        prefix = prefix if prefix is not None else resolve_prefix(tokenizer)
        encoded = prefix.apply(words)
        fed_first = ProbeToken(
            encoded[0],
            "what the tokenizer puts first" if prefix.token_ids else "the text's first token: nothing is put before it",
            token_text(tokenizer, encoded[0]),
        )
        words = encoded[1:]
        if not words:
            raise AttentionError("the probe text is one token: give a text of at least two tokens")
        located = locate_massive_weights(model, 1, tokenizer=tokenizer, first_token=fed_first, blocks=blocks)
    elif located is None:
        located = locate_massive_weights(model, 1, tokenizer=tokenizer, probe_token=probe_token, blocks=blocks)
    if located.probe_token_id is None:
        raise AttentionError("the locator result names no probe token (both layer and indices were overridden)")
    notes += list(located.warnings)
    probe = int(located.probe_token_id) if fed_first is None else fed_first.token_id
    if fed_first is not None and located.probe_token_id != fed_first.token_id:
        notes.append(
            f"the input's first token {fed_first.token_id} carries no massive activation alone: the massive "
            f"layer comes from the locator's next candidate {located.probe_token_id} ({located.probe_token_source})"
        )
    tokens_of = (
        (lambda ids: [token_text(tokenizer, i) or str(i) for i in ids]) if tokenizer is not None else (lambda ids: None)
    )
    runs = _placements(probe, words)

    with eager_attention(model, notes) as implementation:
        passes = {}
        for name, (ids, _) in runs.items():
            report_layer = (lambda done, total, name=name: progress(name, done, total)) if progress else None
            passes[name] = attention_pass(model, ids, blocks, report_layer)

    probs, residual = passes["start"]
    m_pos = layer_ids.index(located.layer)
    dims = massive_dims(residual[m_pos][0])
    d = torch.tensor(dims)
    layers = []
    for index, p, r in zip(layer_ids, probs, residual):
        mean = p.mean(dim=0)
        share = key_share(mean)
        heads = None
        if per_head:
            hs = key_share(p)
            heads = [HeadAttention(h, hs[h].tolist(), float(hs[h, 0]), int(hs[h].argmax())) for h in range(p.shape[0])]
        layers.append(
            LayerAttention(
                index,
                float(share[0]),
                int(share.argmax()),
                share.tolist(),
                mean.tolist(),
                r[:, d].max(dim=1).values.tolist(),
                heads,
            )
        )
    if position_layer is None:
        after = [s for s in layers if s.layer > located.layer] or layers
        position_layer = max(after, key=lambda s: s.sink_share).layer
    at = layer_ids.index(position_layer)

    placements = []
    for name, (ids, pos) in runs.items():
        p_all, r_all = passes[name]
        means = [p.mean(dim=0) for p in p_all]
        on = []
        for mean in means:
            after = mean[pos + 1 :, pos] if pos is not None else mean[:0, 0]
            on.append(float(after.mean()) if after.numel() else None)
        placements.append(
            PlacementRun(
                name,
                ids,
                tokens_of(ids),
                pos,
                [r[:, d].max(dim=1).values.tolist() for r in r_all],
                [key_share(mean).tolist() for mean in means],
                on,
                means[at].tolist(),
            )
        )
    return AttentionReport(
        model=model_name(model),
        text=shown,
        input_ids=runs["start"][0],
        tokens=tokens_of(runs["start"][0]),
        probe_token_id=probe,
        probe_token_text=fed_first.text if fed_first is not None else located.probe_token_text,
        probe_token_source=fed_first.source if fed_first is not None else located.probe_token_source,
        massive_layer=located.layer,
        massive=located.massive,
        massive_dims=dims,
        attn_implementation=implementation,
        layers=layers,
        position_layer=position_layer,
        placements=placements,
        num_heads=int(probs[0].shape[0]),
        notes=notes,
        prefix=prefix.protocol() if prefix is not None else None,
    )
