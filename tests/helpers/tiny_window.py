"""A planted "reader" with a known reach: it answers the pass-key question only when the pass-key
sentence lies within the last ``window`` tokens of its prompt.

Its rule, token by token: find the FIRST occurrence of ``marker`` (the ids of " pass key is")
that starts within the last ``window`` prompt tokens; after g generated tokens answer with the
prompt token ``g`` places after the marker, and with EOS once that runs past the prompt or when no
marker starts in the window. The needle "The pass key is 12345. ..." is the first occurrence when
it is in reach, so the answer copies " 12345. Remember ..."; otherwise the first occurrence is
the question's own "The pass key is" at the very end, whose continuation is the end of the
prompt: EOS at once, no number. So needle accuracy is 1 exactly where the needle's marker is
within ``window`` tokens of the prompt's end: a hand-computable grid.

It speaks what lm-eval's HFLM asks of a model in memory: ``config`` (``model_type``, positions),
``device``, ``tie_weights``, ``generate`` (greedy over its own forward, with HF's ``stopping_criteria``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch import nn


class _History:
    """The 'KV cache': every row's tokens so far (padded like the batch) and its prompt length."""

    def __init__(self, ids: torch.Tensor, prompt_lengths: list[int]) -> None:
        self.ids, self.prompt_lengths = ids, prompt_lengths

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        keep = indices.tolist()
        self.ids = self.ids[indices]
        self.prompt_lengths = [self.prompt_lengths[i] for i in keep]


class WindowReader(nn.Module):
    def __init__(self, vocab_size: int, eos_id: int, marker: Sequence[int], window: int) -> None:
        super().__init__()
        self.vocab_size, self.eos_id, self.marker, self.window = vocab_size, eos_id, list(marker), window
        self.weight = nn.Parameter(torch.zeros(1))  # a device for the generator
        self.config = SimpleNamespace(
            max_position_embeddings=100_000, _attn_implementation="none", _name_or_path="", model_type="llama"
        )
        self.generation_config = SimpleNamespace(eos_token_id=eos_id)

    def _answer(self, real: list[int], prompt_length: int) -> int:
        prompt, generated = real[:prompt_length], len(real) - prompt_length
        m = len(self.marker)
        for start in range(max(0, prompt_length - self.window), prompt_length - m + 1):
            if prompt[start : start + m] == self.marker:
                at = start + m + generated
                return prompt[at] if at < prompt_length else self.eos_id
        return self.eos_id

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[_History] = None,
        use_cache: bool = True,
        **kwargs,
    ):
        if past_key_values is None:
            history = _History(input_ids.clone(), [int(n) for n in attention_mask.sum(-1).tolist()])
        else:
            history = past_key_values
            history.ids = torch.cat([history.ids, input_ids], dim=1)
        logits = torch.full((input_ids.shape[0], 1, self.vocab_size), -1e4)
        for row in range(input_ids.shape[0]):
            real = history.ids[row][attention_mask[row].bool()].tolist()
            logits[row, 0, self._answer(real, history.prompt_lengths[row])] = 1e4
        return SimpleNamespace(logits=logits, past_key_values=history)

    def tie_weights(self) -> None:  # HFLM calls it; nothing is tied here
        pass

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_length, stopping_criteria=(), **_):
        """Greedy, all rows together, until ``max_length`` or every row's criteria say stop."""
        out = self(input_ids, attention_mask)
        ids, mask = input_ids, attention_mask
        while ids.shape[1] < max_length:
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            if stopping_criteria and all(bool(torch.as_tensor(c(ids, None)).all()) for c in stopping_criteria):
                break
            out = self(token, mask, past_key_values=out.past_key_values)
        return ids
