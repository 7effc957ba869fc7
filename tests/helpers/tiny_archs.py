"""Tiny random models of every supported architecture, with planted massive weights.

Planting goes through the same block API the plugin uses (``row_targets``/``down_target``), so a
wrong row layout (fused halves, Conv1D's transposed weights, the wrong expert) cannot plant and
locate consistently by accident: the tests also check the planted units directly.
"""

from __future__ import annotations

import torch

from llamafactory_macdrop.core.architectures import find_ffn_blocks

H, I, V = 64, 128, 256
BOS, EOS = 1, 2
LAYERS = 3
PLANTED_LAYER = 1
PLANTED_INDICES = [97, 13, 64, 5, 120]
DECOY_INDEX = 50
PLANTED_EXPERT = 2
MOE = dict(num_experts_per_tok=2, router_jitter_noise=0.0)


def configs(layers: int = LAYERS, vocab: int = V):
    import transformers as tf

    COMMON = dict(vocab_size=vocab, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=3, tie_word_embeddings=False)  # noqa: N806
    LAYERS = layers  # noqa: N806 - the configs below read it
    LLAMA_LIKE = dict(
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=layers,
        num_attention_heads=4,  # noqa: N806
        num_key_value_heads=2,
        max_position_embeddings=64,
        **COMMON,
    )
    return {
        "llama": tf.LlamaConfig(**LLAMA_LIKE),
        "mistral": tf.MistralConfig(**LLAMA_LIKE),
        "qwen2": tf.Qwen2Config(**LLAMA_LIKE),
        "qwen3": tf.Qwen3Config(**LLAMA_LIKE, head_dim=16),
        "olmo": tf.OlmoConfig(**LLAMA_LIKE),
        "olmo2": tf.Olmo2Config(**LLAMA_LIKE),
        "gemma2": tf.Gemma2Config(**LLAMA_LIKE, head_dim=16),
        "gemma3": tf.Gemma3TextConfig(**LLAMA_LIKE, head_dim=16),
        "phi3": tf.Phi3Config(**LLAMA_LIKE),
        "gpt2": tf.GPT2Config(n_embd=H, n_inner=I, n_layer=LAYERS, n_head=4, n_positions=64, **COMMON),
        "opt": tf.OPTConfig(
            hidden_size=H,
            ffn_dim=I,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            word_embed_proj_dim=H,
            max_position_embeddings=64,
            **COMMON,
        ),
        "gpt_neox": tf.GPTNeoXConfig(
            hidden_size=H,
            intermediate_size=I,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
            **COMMON,
        ),
        "mixtral": tf.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, **MOE),
        "qwen2_moe": tf.Qwen2MoeConfig(
            **LLAMA_LIKE,
            num_experts=4,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=32,
            decoder_sparse_step=1,
            **MOE,
        ),
        "qwen3_moe": tf.Qwen3MoeConfig(
            **LLAMA_LIKE, num_experts=4, moe_intermediate_size=I, head_dim=16, decoder_sparse_step=1, **MOE
        ),
    }


ARCHITECTURES = list(configs())


def build(name: str, seed: int = 0, vocab: int = V, layers: int = LAYERS):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs(layers, vocab)[name]).eval()
    plant(model)
    return model


def save_with_tokenizer(name: str, out_dir):
    """A planted model of ``name`` plus the tiny BPE tokenizer, ready for LLaMA-Factory."""
    from . import tiny

    tok = tiny.build_tokenizer(out_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    model = build(name, vocab=len(tok))
    model.save_pretrained(out_dir)
    return out_dir


def _set(target, fn) -> None:
    rows = target.read()
    fn(rows)
    target.write(rows)


@torch.no_grad()
def plant(model, token: int = BOS) -> None:
    """Massive weights at PLANTED_LAYER, triggered by ``token`` (BOS unless told)."""
    emb = model.get_input_embeddings().weight
    emb[:, :2] = 0.0
    emb[token, 0] = 5.0
    blocks = find_ffn_blocks(model)
    for layer, rows, gains, writes in (
        (0, [DECOY_INDEX], [400.0], False),  # decoy: huge unit that writes nothing
        (PLANTED_LAYER, PLANTED_INDICES, [100.0 - 15.0 * r for r in range(5)], True),
    ):
        block = blocks[layer]
        expert = None
        if block.is_moe:  # route BOS to one expert at every MoE layer
            expert = PLANTED_EXPERT
            block.router.weight[:, 0] = 0.0
            block.router.weight[expert, 0] = 5.0
        targets = block.row_targets(rows, expert=expert)
        gain = torch.tensor(gains)
        if len(targets) == 2:  # gate, up
            _set(targets[0], lambda w: w[:, 0].fill_(1.0))
            _set(targets[1], lambda w, gain=gain: w[:, 0].copy_(gain))
        else:  # act(up(x)): positive pre-activation
            _set(targets[0], lambda w, gain=gain: w[:, 0].copy_(gain))
        down = block.down_target(rows, expert=expert)
        _set(down, lambda w, writes=writes: (w.zero_(), w[:, 1].fill_(1.0 if writes else 0.0)))
        post_norm = getattr(block.layer, "post_feedforward_layernorm", None)
        if writes and post_norm is not None and getattr(post_norm, "weight", None) is not None:
            post_norm.weight[1] = 500.0  # post-FFN norms (OLMo2, Gemma) rescale what the FFN writes


# ----------------------------------------------------------------------------- locator traps
TINY_EMB_MAX = 0.05
TINY_EMB_LAYER0_GAIN = 0.28  # layer 0 lifts residual dim 3 from ~0 to ~5: an ~100x jump of nothing massive
TINY_EMB_ORIGIN = 2
TINY_EMB_INDICES = [7, 70, 33, 101, 12]  # largest first
TINY_EMB_GAINS = [2.0, 1.5, 1.0, 0.6, 0.4]  # layer 2 writes ~350 into dim 1: a ~70x jump to massive


@torch.no_grad()
def build_tiny_embeddings(origin: bool = True, layers: int = 6, seed: int = 0, vocab: int = V):
    """A Qwen2-style model whose embeddings are tiny (max |e| = 0.05, every token has 0.05 in dim 0,
    as on the real 0.5B model of issue 12) and whose attention writes nothing (o_proj = 0), so the
    residual stream is exactly the planted FFN writes:

    * layer 0: one unit reads dim 0 and writes ~5 into dim 3 (residual max 0.05 -> ~5, jump ~100);
    * layer ``TINY_EMB_ORIGIN`` (2), when ``origin``: rows ``TINY_EMB_INDICES`` read dim 3 and write
      ~350 into dim 1 (jump ~70), which every later layer keeps.

    A pure jump rule picks layer 0; the origin is 2. With ``origin=False`` nothing is massive
    anywhere (residual max ~5), yet the largest jump is still ~100x.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs(layers, vocab)["qwen2"]).eval()
    emb = model.get_input_embeddings().weight
    emb.copy_(torch.randn_like(emb).mul_(0.01).clamp_(-0.04, 0.04))
    emb[:, 0] = TINY_EMB_MAX
    blocks = find_ffn_blocks(model)
    for block in blocks:
        block.layer.self_attn.o_proj.weight.zero_()
        block.down.weight.zero_()
    mlp0 = blocks[0].layer.mlp
    mlp0.gate_proj.weight[10].zero_(), mlp0.up_proj.weight[10].zero_()
    mlp0.gate_proj.weight[10, 0], mlp0.up_proj.weight[10, 0] = 1.0, TINY_EMB_LAYER0_GAIN
    mlp0.down_proj.weight[3, 10] = 1.0
    if origin:
        mlp = blocks[TINY_EMB_ORIGIN].layer.mlp
        for idx, gain in zip(TINY_EMB_INDICES, TINY_EMB_GAINS):
            mlp.gate_proj.weight[idx].zero_(), mlp.up_proj.weight[idx].zero_()
            mlp.gate_proj.weight[idx, 3], mlp.up_proj.weight[idx, 3] = 1.0, gain
            mlp.down_proj.weight[1, idx] = 1.0
    return model


def save_chatml_model(out_dir, trigger: str = "<|im_start|>"):
    """A Qwen-style folder: ChatML tokenizer WITHOUT a BOS (``<|endoftext|>`` 0, ``<|im_start|>`` 1,
    ``<|im_end|>`` 2), config ``bos_token_id`` = ``<|endoftext|>`` and ``eos_token_id`` = ``<|im_end|>``
    like Qwen2.5-Instruct, and massive weights at PLANTED_LAYER that only ``trigger`` sets off: the
    config's BOS, which no chat sequence starts with, triggers nothing."""
    from . import tiny

    tok = tiny.build_chatml_tokenizer(out_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert list(ids.values()) == [0, 1, 2]
    assert tok.bos_token_id is None
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    cfg = configs(LAYERS, len(tok))["qwen2"]
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|endoftext|>"]
    model = AutoModelForCausalLM.from_config(cfg).eval()
    plant(model, token=ids[trigger])
    with torch.no_grad():
        # ordinary tokens get embeddings of a real model's scale (the pad row <|endoftext|> included,
        # which starts at zero), so that attention's small writes into dim 0 stay small after the norm
        emb = model.get_input_embeddings().weight
        emb[:, 2:] = torch.randn(emb.shape[0], emb.shape[1] - 2) * 0.5
        # the planted rows read dim 0 only, so no other token sets them off even slightly
        for target in find_ffn_blocks(model)[PLANTED_LAYER].row_targets(PLANTED_INDICES):
            _set(target, lambda w: w[:, 1:].zero_())
    model.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- attention sink, MoE routing
SINK_LAYERS = 4  # layers 0..1 attend uniformly (q = 0), layers 2..3 hold a planted sink on BOS
SINK_FROM = PLANTED_LAYER + 1


@torch.no_grad()
def build_planted_sink(layers: int = SINK_LAYERS, seed: int = 0, vocab: int = V):
    """A planted Qwen2 (q/k/v have biases) whose attention is known by construction:

    * up to the massive layer (PLANTED_LAYER), q_proj's weight and bias are zero: every score is
      0, so each query spreads its attention uniformly over the keys it may see (1/(q+1) each);
    * from the next layer on, q is a constant (bias only, in the lowest-frequency RoPE pair,
      which barely rotates over a few positions) and k reads residual dim 1, where only the BOS
      carries the massive activation that PLANTED_LAYER writes: every query puts almost all of its
      attention on position 0 (a sink, caused by the massive activation, starting right after it).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs(layers, vocab)["qwen2"]).eval()
    plant(model)
    # as in save_chatml_model: ordinary tokens get embeddings of a real model's scale and the planted
    # rows read dim 0 only, so the massive activation (and what the norms make of it) is BOS's alone
    emb = model.get_input_embeddings().weight
    emb[:, 2:] = torch.randn(emb.shape[0], emb.shape[1] - 2) * 0.5
    for target in find_ffn_blocks(model)[PLANTED_LAYER].row_targets(PLANTED_INDICES):
        _set(target, lambda w: w[:, 1:].zero_())
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    slow = d // 2 - 1  # rotate_half pairs i with i + d/2; the last pair has the lowest frequency
    for i, block in enumerate(find_ffn_blocks(model)):
        attn = block.layer.self_attn
        attn.q_proj.weight.zero_()
        attn.q_proj.bias.zero_()
        if i < SINK_FROM:
            continue
        for h in range(cfg.num_attention_heads):
            attn.q_proj.bias[h * d + slow] = 4.0
        for h in range(cfg.num_key_value_heads):
            for row in (h * d + slow, h * d + slow + d // 2):
                attn.k_proj.weight[row].zero_()
                attn.k_proj.bias[row] = 0.0
            attn.k_proj.weight[h * d + slow, 1] = 4.0
    return model


ROUTED_EXPERT = PLANTED_EXPERT  # the expert that holds the massive rows wins the probe at the massive layer


@torch.no_grad()
def build_routed_moe(name: str = "mixtral", layers: int = 4, seed: int = 0, vocab: int = V):
    """A planted MoE model whose router probabilities for BOS are known: every router weight is
    zero (logits 0, so each expert gets exactly 1/num_experts), except at PLANTED_LAYER, where
    the router reads BOS's dim 0 with a large gain for ROUTED_EXPERT (probability ~1)."""
    model = build(name, seed=seed, vocab=vocab, layers=layers)
    for block in find_ffn_blocks(model):
        if block.is_moe:
            block.router.weight.zero_()
            if block.index == PLANTED_LAYER:
                block.router.weight[ROUTED_EXPERT, 0] = 20.0
    return model


# ----------------------------------------------------------------------------- uneven FFN widths
@torch.no_grad()
def build_uneven_widths(width0: int, width_origin: int, seed: int = 0, vocab: int = V):
    """A 3-layer planted Llama whose FFN widths differ per layer: layer 0 has ``width0``
    intermediate units, PLANTED_LAYER (the origin, 1) and layer 2 have ``width_origin``.

    Built by hand (no config names per-layer widths): two models of the same seed and init, one
    per width, and layer 0's MLP taken from the ``width0`` one; then planted as :func:`plant` does
    (decoy DECOY_INDEX at layer 0, massive rows PLANTED_INDICES at PLANTED_LAYER), so the origin is
    known by construction. Both widths must exceed max(PLANTED_INDICES) and DECOY_INDEX as needed.
    """
    from transformers import AutoModelForCausalLM

    assert width0 > DECOY_INDEX
    assert width_origin > max(PLANTED_INDICES)
    built = []
    for width in (width_origin, width0):
        cfg = configs(LAYERS, vocab)["llama"]
        cfg.intermediate_size = width
        torch.manual_seed(seed)
        built.append(AutoModelForCausalLM.from_config(cfg).eval())
    model, wide = built
    model.model.layers[0].mlp = wide.model.layers[0].mlp
    plant(model)
    return model
