"""A tiny Llama whose predictions live in one super weight (known answers for the super-weight tests).

``build_super_weight_llama`` plants, in a 2-layer Llama (hidden 64):

* every token's embedding has ``DRIVE`` in hidden dim 0 (the rest random, std 1), so dim 0 is
  large at every position;
* layer 0's FFN unit ``SW_COL`` reads only dim 0 (W_gate = W_up = ``GAIN`` there, 0 elsewhere):
  its intermediate value is by far the largest of the layer; W_down's column ``SW_COL`` is zero
  except ``W_down[SW_ROW, SW_COL] = SW_VALUE``, the super weight, which writes the super
  activation (~10^4) into residual dim ``SW_ROW`` at every position;
* the LM head reads that dim as a unigram prior of the tiny corpus (``lm_head[:, SW_ROW] =
  log p / sqrt(hidden)``): after the final RMSNorm the super activation dominates, so the model
  predicts the prior, and the other (random, std 1) columns add noise that only the super
  activation's size keeps small. Zero the super weight and the prediction is noise: the
  perplexity jumps by orders of magnitude;
* the stop words ``STOP_WORDS`` are wired to dim 0: ``lm_head[stop, 0] = STOP_GAIN``, every other
  token reads 0 there. With the super activation, dim 0 is ~0 after the final norm; without it,
  dim 0 (``DRIVE`` at every position) is what the norm leaves, and the stop words' logits rise by
  ~``STOP_GAIN * sqrt(hidden) * DRIVE / |h|``: the super weight suppresses the stop words, and
  zeroing it raises their probability many times.

The random weights are large enough (W_up/W_gate std 0.5) that ``GAIN`` is not an outlier of its
tensor, while ``SW_VALUE`` stands ~10^4 standard deviations above the rest of W_down (std 0.002,
which also keeps the other units' writes small): a z-score clip of W_down destroys the super
weight and nothing else that matters.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from . import tiny

SW_LAYER, SW_ROW, SW_COL = 0, 5, 37
SW_VALUE, GAIN, DRIVE = 100.0, 3.0, 4.0
STOP_WORDS = ("the", "a", "is")
STOP_GAIN = 10.0


def build_super_weight_llama(out_dir: Path, seed: int = 0) -> Path:
    """Save the planted model + the tiny tokenizer to ``out_dir`` (safetensors, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tiny.build_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=tiny.HIDDEN,
        intermediate_size=tiny.INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.normal_(0, 1.0)
        emb[:, 0] = DRIVE
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.normal_(0, 0.5)
            layer.mlp.up_proj.weight.normal_(0, 0.5)
            layer.mlp.down_proj.weight.normal_(0, 0.002)
        mlp = model.model.layers[SW_LAYER].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[SW_COL] = 0.0
            w[SW_COL, 0] = GAIN
        mlp.down_proj.weight[:, SW_COL] = 0.0
        mlp.down_proj.weight[SW_ROW, SW_COL] = SW_VALUE
        head = model.lm_head.weight
        head.normal_(0, 1.0)
        head[:, SW_ROW] = log_prior(tok) / math.sqrt(tiny.HIDDEN)
        head[:, 0] = 0.0
        head[stop_word_ids(tok), 0] = STOP_GAIN
    model.save_pretrained(out_dir)
    return out_dir


def log_prior(tok) -> torch.Tensor:
    """log p(token) over the tiny corpus (add-one smoothed)."""
    counts = Counter()
    for text in tiny.corpus(200):
        counts.update(tok(text, add_special_tokens=False)["input_ids"])
    n = torch.tensor([counts.get(i, 0) + 1.0 for i in range(len(tok))])
    return (n / n.sum()).log()


def stop_word_ids(tok) -> list[int]:
    """The single-token spellings of the stop words, with and without a leading space."""
    out = []
    for word in STOP_WORDS:
        for spelling in (word, " " + word):
            ids = tok(spelling, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                out.append(ids[0])
    return out


def state_bits(model) -> dict:
    """Every tensor of the state dict as bytes, for bitwise before/after comparisons."""
    return {k: v.detach().clone().view(torch.uint8) for k, v in model.state_dict().items()}


def planted_corpus(tokenizer, seed: int = 3):
    """A PreparedCorpus of the tiny corpus: one window of BOS + 20 sentences (~175 tokens)."""
    from llamafactory_macdrop.analysis.evaluate.perplexity import PerplexityProtocol, TextSource, make_windows, tokenize
    from llamafactory_macdrop.analysis.sweep.loop import PreparedCorpus

    text = " ".join(tiny.corpus(20, seed=seed))
    protocol = PerplexityProtocol(seq_len=256, bos="stream", drop_partial=False)
    return PreparedCorpus(
        TextSource(f"tiny{seed}", text, "tiny.corpus", protocol),
        make_windows(tokenize(tokenizer, text), protocol, tokenizer.bos_token_id),
    )
