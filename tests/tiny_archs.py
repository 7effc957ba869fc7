"""Tiny random models of every supported architecture, with planted massive weights.

Planting goes through the same block API the plugin uses (``row_targets``/``down_target``), so a
wrong row layout (fused halves, Conv1D's transposed weights, the wrong expert) cannot plant and
locate consistently by accident: the tests also check the planted units directly.
"""

from __future__ import annotations

import torch

from llamafactory_macdrop.architectures import find_ffn_blocks

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
    LLAMA_LIKE = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=layers, num_attention_heads=4,  # noqa: N806
                      num_key_value_heads=2, max_position_embeddings=64, **COMMON)
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
        "opt": tf.OPTConfig(hidden_size=H, ffn_dim=I, num_hidden_layers=LAYERS, num_attention_heads=4,
                            word_embed_proj_dim=H, max_position_embeddings=64, **COMMON),
        "gpt_neox": tf.GPTNeoXConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, max_position_embeddings=64, **COMMON),
        "mixtral": tf.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, **MOE),
        "qwen2_moe": tf.Qwen2MoeConfig(**LLAMA_LIKE, num_experts=4, moe_intermediate_size=I,
                                       shared_expert_intermediate_size=32, decoder_sparse_step=1, **MOE),
        "qwen3_moe": tf.Qwen3MoeConfig(**LLAMA_LIKE, num_experts=4, moe_intermediate_size=I, head_dim=16,
                                       decoder_sparse_step=1, **MOE),
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
    import tiny

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
def plant(model) -> None:
    emb = model.get_input_embeddings().weight
    emb[:, :2] = 0.0
    emb[BOS, 0] = 5.0
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
            _set(targets[1], lambda w: w[:, 0].copy_(gain))
        else:  # act(up(x)): positive pre-activation
            _set(targets[0], lambda w: w[:, 0].copy_(gain))
        down = block.down_target(rows, expert=expert)
        _set(down, lambda w: (w.zero_(), w[:, 1].fill_(1.0 if writes else 0.0)))
        post_norm = getattr(block.layer, "post_feedforward_layernorm", None)
        if writes and post_norm is not None and getattr(post_norm, "weight", None) is not None:
            post_norm.weight[1] = 500.0  # post-FFN norms (OLMo2, Gemma) rescale what the FFN writes
