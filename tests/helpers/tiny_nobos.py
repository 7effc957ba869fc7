"""A planted tiny Llama whose tokenizer adds NO BOS while its config names one (Qwen-style).

The answers are known by construction:

* the tokenizer is tests/helpers/tiny.py's ChatML one (``<|endoftext|>`` 0, ``<|im_start|>`` 1,
  ``<|im_end|>`` 2, no BOS), the config says ``bos_token_id`` = 0 (``<|endoftext|>``), a token the
  tokenizer never puts first;
* every ordinary token (and ``<|im_start|>``, which chat sequences start with) carries hidden dim 0,
  which the rows ``PLANTED_INDICES`` of layer ``PLANTED_LAYER``'s W_gate/W_up read alone: their
  intermediate units are huge and ordered as listed, and W_down's column of the top-1 row writes
  them into residual dim ``SW_ROW``: the super weight is (PLANTED_LAYER, SW_ROW, PLANTED_INDICES[0]);
* the config's BOS carries dim 2 only, which a DECOY unit of layer 0 reads with a much larger gain
  and writes into residual dim ``DECOY_ROW``: fed first (as a config-BOS prefix would), it makes
  layer 0's down projection the largest spike anywhere, so the super-weight rule answers
  (0, DECOY_ROW, DECOY_INDEX) — the wrong one. On the tokenizer's own encoding it is never fed.
"""

from __future__ import annotations

from pathlib import Path

import torch

PLANTED_LAYER = 1
PLANTED_INDICES = [97, 13, 64, 5, 120]  # largest first
SW_ROW = 1
DECOY_INDEX, DECOY_ROW = 50, 3
CONFIG_BOS = 0  # <|endoftext|>
HIDDEN, INTERMEDIATE, LAYERS = 64, 128, 3


@torch.no_grad()
def build_no_bos_llama(out_dir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from . import tiny

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny.build_chatml_tokenizer(out_dir)
    assert tok.bos_token_id is None
    assert tok.convert_tokens_to_ids("<|endoftext|>") == CONFIG_BOS
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=CONFIG_BOS,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=CONFIG_BOS,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    emb = model.get_input_embeddings().weight
    emb[:, 0] = 0.0
    emb[:, 2] = 0.0
    emb[3:, 0] = 5.0  # ordinary tokens
    emb[1, 0] = 5.0  # <|im_start|>
    emb[CONFIG_BOS, 2] = 5.0  # the config's BOS: the decoy channel only
    layers = model.model.layers
    mlp = layers[PLANTED_LAYER].mlp
    for rank, idx in enumerate(PLANTED_INDICES):
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[idx].zero_()
        mlp.gate_proj.weight[idx, 0] = 1.0
        mlp.up_proj.weight[idx, 0] = 10.0 - 1.5 * rank
        mlp.down_proj.weight[:, idx] = 0.0
        mlp.down_proj.weight[SW_ROW, idx] = 1.0
    decoy = layers[0].mlp
    for w in (decoy.gate_proj.weight, decoy.up_proj.weight):
        w[DECOY_INDEX].zero_()
    decoy.gate_proj.weight[DECOY_INDEX, 2] = 1.0
    decoy.up_proj.weight[DECOY_INDEX, 2] = 40.0
    decoy.down_proj.weight[:, DECOY_INDEX] = 0.0
    decoy.down_proj.weight[DECOY_ROW, DECOY_INDEX] = 1.0
    model.save_pretrained(out_dir)
    return out_dir
