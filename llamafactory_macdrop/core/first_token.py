"""What the model really sees first: the token at position 0 of its training sequences.

The locator probes one token alone at position 0 (docs/locator.md). Which token matters: on some
models only particular tokens carry the massive activation, and a config's BOS may be a token no
training sequence ever starts with (Qwen-style models: ``bos_token_id`` is ``<|endoftext|>``, every
chat sequence starts with ``<|im_start|>``). Two views of the same question:

* during training, :func:`batch_first_token` reads the first micro-batch (sft, pt, packed or
  not, DPO's concatenated chosen/rejected ``input_ids``) and takes the most frequent first real
  token (after left padding, if any), with its share;
* outside training, :func:`template_first_token` asks the chat template (LLaMA-Factory's, when
  ``--template NAME`` is given: :func:`llamafactory_macdrop.plugin.lf.templates.lf_template`
  resolves the name; else the tokenizer's own) or the tokenizer (does it prepend BOS?) what
  comes first.

Nothing here imports LLaMA-Factory: a template is any object with LLaMA-Factory's
``fix_special_tokens`` and ``encode_oneturn``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Optional

import torch

from .locator import ProbeToken, token_text
from .text_prefix import tokenizer_prefix

_SAMPLE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _first_positions(ids: torch.Tensor, mask: Any) -> list[int]:
    """The first real token of every row (the first position whose attention mask is set)."""
    out = []
    use_mask = torch.is_tensor(mask) and mask.shape == ids.shape
    for row in range(ids.shape[0]):
        pos = 0
        if use_mask:
            real = mask[row].nonzero()
            if real.numel() == 0:
                continue
            pos = int(real[0])
        out.append(int(ids[row, pos]))
    return out


def batch_first_token(inputs: Mapping[str, Any], tokenizer: Any = None) -> Optional[ProbeToken]:
    """The most frequent first token of a training batch (None when it holds no token ids).

    ``input_ids`` is what LLaMA-Factory's collators give every stage (DPO: chosen rows then
    rejected rows); TRL-style ``prompt_input_ids`` come next, then any other ``*input_ids``.
    Ties go to the token met first.
    """
    keys = [k for k in inputs if k.endswith("input_ids") and torch.is_tensor(inputs[k]) and inputs[k].dim() == 2]
    for preferred in ("input_ids", "prompt_input_ids"):
        if preferred in keys:
            keys = [preferred]
            break
    firsts: list[int] = []
    for key in keys:
        firsts += _first_positions(inputs[key], inputs.get(key[: -len("input_ids")] + "attention_mask"))
    if not firsts:
        return None
    token, count = Counter(firsts).most_common(1)[0]
    source = f"first training batch: position 0 of {count}/{len(firsts)} sequences ({count / len(firsts):.0%})"
    return ProbeToken(int(token), source, token_text(tokenizer, token))


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if encoded and isinstance(encoded[0], (list, tuple)):
        encoded = encoded[0]
    return [int(i) for i in encoded]


def template_first_token(tokenizer: Any, template: Any = None, name: Optional[str] = None) -> Optional[ProbeToken]:
    """The first token of a chat-formatted training sequence, as ``llamafactory-cli train`` would
    build it (None when nothing special comes first: plain text without BOS).

    ``template``: a LLaMA-Factory template (``name``: what the user called it, for the report); its
    ``fix_special_tokens`` is applied to the tokenizer as in training (e.g. ``qwen`` makes ``<|im_end|>`` the EOS). Without it, the
    tokenizer's own chat template (what LLaMA-Factory parses when ``template`` is unset), else the
    token the tokenizer prepends by itself (BOS), if any.
    """
    if tokenizer is None:
        return None
    if template is not None:
        template.fix_special_tokens(tokenizer)
        prompt, _ = template.encode_oneturn(tokenizer, list(_SAMPLE))
        if prompt:
            return ProbeToken(prompt[0], f"template {name or 'given'}: first token", token_text(tokenizer, prompt[0]))
        return None
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = _ids(tokenizer.apply_chat_template(_SAMPLE[:1], tokenize=True, add_generation_prompt=True))
        except Exception:  # noqa: BLE001 - a template that cannot render a plain turn is not a first token
            ids = []
        if ids:
            return ProbeToken(ids[0], "chat template: first token", token_text(tokenizer, ids[0]))
    prefix = tokenizer_prefix(tokenizer)  # the one policy of what goes before a text (core/text_prefix.py)
    if prefix:
        return ProbeToken(prefix[0], "tokenizer prepends it", token_text(tokenizer, prefix[0]))
    return None
