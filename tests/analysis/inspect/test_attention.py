"""attention.py: attention probabilities against an independent softmax, a planted sink, every
architecture, and SmolLM2-135M against the measured reference (docs/analysis.md)."""

import math

import pytest
import torch
from helpers import tiny_archs

from llamafactory_macdrop.analysis.inspect.attention import attention_report

WORDS = [5, 9, 17, 33, 40, 61, 77, 90]  # eight ordinary tokens of the tiny vocabulary


# ----------------------------------------------------------------------------- an independent oracle
def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def softmax_attention_oracle(model, ids):
    """softmax(Q K^T / sqrt(d) + causal mask) per layer and head, rebuilt from each layer's own
    q/k projections (Llama: RoPE with the config's theta, grouped kv heads), from the input of
    each self-attention module. Imports nothing of the package."""
    cfg = model.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    inputs = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.__setitem__(i, kw.get("hidden_states", a[0] if a else None)), with_kwargs=True
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    T = len(ids)
    pos = torch.arange(T, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.cat([torch.outer(pos, inv_freq)] * 2, dim=-1)  # T x d
    cos, sin = angles.cos(), angles.sin()
    out = []
    for i, layer in enumerate(model.model.layers):
        x = inputs[i][0]
        q = layer.self_attn.q_proj(x).view(T, heads, d).transpose(0, 1)
        k = layer.self_attn.k_proj(x).view(T, kv, d).transpose(0, 1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(heads // kv, dim=0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        out.append(scores.softmax(dim=-1))  # heads x T x T
    return out


def test_probabilities_are_the_softmax_of_the_layers_own_queries_and_keys():
    model = tiny_archs.build("llama", layers=3)
    report = attention_report(model, text=WORDS, per_head=True)
    oracle = softmax_attention_oracle(model, report.input_ids)
    assert report.input_ids == [tiny_archs.BOS, *WORDS]  # the located probe token, then the text
    assert [s.layer for s in report.layers] == [0, 1, 2]
    assert report.num_heads == 4
    for s, probs in zip(report.layers, oracle):
        mean = probs.mean(dim=0)
        torch.testing.assert_close(torch.tensor(s.attention), mean, atol=1e-5, rtol=1e-4)
        share = mean[1:].mean(dim=0)  # queries >= 1
        assert s.sink_share == pytest.approx(float(share[0]), abs=1e-5)
        assert s.top_key == int(share.argmax())
        for head in s.heads:
            torch.testing.assert_close(torch.tensor(head.share), probs[head.head, 1:].mean(dim=0), atol=1e-5, rtol=1e-4)


def test_planted_sink_starts_right_after_the_massive_layer():
    model = tiny_archs.build_planted_sink()
    assert model.config._attn_implementation == "sdpa"
    report = attention_report(model, text=WORDS)
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the analysis, and back
    assert report.attn_implementation == "eager"
    assert any("switched to eager" in n for n in report.notes)
    assert report.massive_layer == tiny_archs.PLANTED_LAYER
    assert report.massive_dims == [1]
    T = len(report.input_ids)
    # q = 0 up to the massive layer: every query spreads 1/(q+1) over the keys it sees
    uniform = [sum(1 / (q + 1) for q in range(max(k, 1), T)) / (T - 1) for k in range(T)]
    for s in report.layers[: tiny_archs.SINK_FROM]:
        assert s.share == pytest.approx(uniform, abs=1e-6)
        assert s.sink_share == pytest.approx(uniform[0], abs=1e-6)
        assert s.top_key == 0
    for s in report.layers[tiny_archs.SINK_FROM :]:
        assert s.sink_share > 0.99
        assert s.top_key == 0
    assert report.position_layer >= tiny_archs.SINK_FROM

    # the position experiment: the planted activation follows the BOS token wherever it stands
    runs = {r.placement: r for r in report.placements}
    assert [runs[p].probe_position for p in ("start", "middle", "end", "absent")] == [0, 4, 8, None]
    assert runs["middle"].input_ids == WORDS[:4] + [tiny_archs.BOS] + WORDS[4:]
    last = len(report.layers) - 1
    for name in ("start", "middle", "end"):
        run = runs[name]
        res = run.residual_massive[last]
        assert res[run.probe_position] > 1000 > max(v for i, v in enumerate(res) if i != run.probe_position)
    assert max(runs["absent"].residual_massive[last]) < 1000
    assert runs["middle"].attention_on_probe[last] > 0.99  # the queries after it look at it
    assert runs["middle"].attention_on_probe[0] == pytest.approx(sum(1 / (q + 1) for q in range(5, 9)) / 4, abs=1e-6)
    assert runs["end"].attention_on_probe[last] is None  # no query after the last position


@pytest.mark.parametrize("arch", tiny_archs.ARCHITECTURES)
def test_every_architecture_gives_causal_probabilities(arch):
    model = tiny_archs.build(arch)
    before = model.config._attn_implementation
    report = attention_report(model, text=WORDS[:5])
    assert model.config._attn_implementation == before
    assert report.massive_layer == tiny_archs.PLANTED_LAYER
    assert [s.layer for s in report.layers] == list(range(tiny_archs.LAYERS))
    for s in report.layers:
        a = torch.tensor(s.attention)
        torch.testing.assert_close(a.sum(dim=-1), torch.ones(a.shape[0]), atol=1e-5, rtol=0)
        assert torch.equal(a.triu(1), torch.zeros_like(a))  # no query sees a later key
        assert sum(s.share) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_smollm2_reference(smollm2):
    """docs/analysis.md: eager fp32, <|im_start|> (--probe-token 1) + "Summer is warm. Winter is cold."."""
    model, tok = smollm2
    plain = attention_report(model, tok, position_layer=20)  # as the tokenizer feeds it: nothing first
    assert plain.input_ids == tok("Summer is warm. Winter is cold.")["input_ids"]
    assert plain.probe_token_text == "Summer"
    assert plain.prefix["prefix_token_id"] is None
    assert plain.prefix["tokenizer_adds_bos"] is False
    assert plain.massive_layer == 11
    assert plain.layer(20).top_key == 0
    report = attention_report(model, tok, probe_token=1, position_layer=20)
    assert report.massive_layer == 11
    assert report.massive_dims[0] == 507
    assert report.probe_token_id == 1
    sink = {s.layer: s.sink_share for s in report.layers}
    assert 0.08 <= sink[10] <= 0.16
    assert 0.08 <= sink[11] <= 0.16
    assert all(0.5 <= sink[layer] <= 0.9 for layer in range(12, 30))
    for layer, value in ((12, 0.62), (15, 0.73), (20, 0.82), (29, 0.58)):
        assert sink[layer] == pytest.approx(value, abs=0.02)
    assert all(s.top_key == 0 for s in report.layers if s.layer >= 12)
    runs = {r.placement: r for r in report.placements}
    at20 = [s.layer for s in report.layers].index(20)
    for name in ("start", "middle", "end", "absent"):  # the first token carries it, whatever it is
        assert 22000 < runs[name].residual_massive[at20][0] < 26000
    middle = runs["middle"]
    assert middle.residual_massive[at20][middle.probe_position] < 300  # BOS in the middle: none
    assert middle.attention_on_probe[at20] < 0.15
