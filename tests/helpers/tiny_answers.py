"""A tiny Llama whose greedy answers are known by construction: the next token is a planted
function of the LAST token alone.

Every attention output (o_proj) and MLP output (down_proj) is zero, so the residual stream at a
position is that token's embedding; each planted source token's embedding is its own basis
direction of the hidden space, and the LM head writes a large logit for its planted successor
from that direction (nothing else gets one). So a prompt ending in ``sky`` is answered ``blue``
if ``sky -> blue -> </s>`` is planted, whatever came before, and chains of tokens spell known
answers ("[RESULT]3" for a judge). Tokens without a planted successor continue arbitrarily: the
tests only follow planted chains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

HIDDEN = 64


def chain_ids(tok, pieces: Sequence[str]) -> list[int]:
    """The ids of tokens given as the tokenizer writes them (``Ġsky``, ``</s>``, ``[``)."""
    ids = tok.convert_tokens_to_ids(list(pieces))
    assert tok.unk_token_id not in ids or "<unk>" in pieces, (pieces, ids)
    return ids


@torch.no_grad()
def build_successor_llama(out_dir: Path, chains: Sequence[Sequence[str]], tokenizer: str = "plain") -> Path:
    """Save a model + tokenizer (``plain``: tests/tiny.py's Llama-like one; ``chatml``: its ChatML
    one) where every chain ``[a, b, c, ...]`` plants a -> b -> c -> ... (token texts as the
    tokenizer writes them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from . import tiny

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny.build_tokenizer(out_dir) if tokenizer == "plain" else tiny.build_chatml_tokenizer(out_dir)
    successor: dict[int, int] = {}
    for chain in chains:
        ids = chain_ids(tok, chain)
        for a, b in zip(ids, ids[1:]):
            assert successor.get(a, b) == b, f"{tok.convert_ids_to_tokens(a)} already continues otherwise"
            successor[a] = b
    assert len(successor) < HIDDEN
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    head.zero_()
    for dim, (source, target) in enumerate(successor.items()):
        emb[source] = 0.0
        emb[source, dim] = 1.0
        head[target, dim] = 10.0
    model.save_pretrained(out_dir)
    return out_dir
