"""Independent language-model oracles: a log-likelihood scorer (the lm-eval bridge's accuracies)
and a greedy decoder without a cache (generation under attack).

It scores a multiple-choice document the way lm-eval documents its ``acc`` metric: the sum of
log-probabilities of the continuation ``target_delimiter + choice`` given the context, the
continuation's tokens being those of ``encode(context + continuation)`` after ``encode(context)``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def choice_logliks(model, tokenizer, context: str, choices, delimiter: str = " ") -> list[float]:
    ctx = tokenizer.encode(context)
    out = []
    for choice in choices:
        cont = tokenizer.encode(context + delimiter + choice)[len(ctx) :]
        ids = torch.tensor([(ctx + cont)[:-1]])
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)[-len(cont) :]
        out.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
    return out


def arc_context(doc) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def preferred(model, tokenizer, doc) -> int:
    scores = choice_logliks(model, tokenizer, arc_context(doc), doc["choices"]["text"])
    return max(range(len(scores)), key=scores.__getitem__)


@torch.no_grad()
def argmax_loop(model, ids, n: int, eos: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence again at every step, no cache; the new
    tokens, the end token included when it comes."""
    ids, new = list(ids), []
    for _ in range(n):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        new.append(token)
        if token == eos:
            break
        ids.append(token)
    return new
