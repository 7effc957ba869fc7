"""An independent log-likelihood scorer, the oracle for the lm-eval bridge's accuracies.

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
        cont = tokenizer.encode(context + delimiter + choice)[len(ctx):]
        ids = torch.tensor([(ctx + cont)[:-1]])
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)[-len(cont):]
        out.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
    return out


def arc_context(doc) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def preferred(model, tokenizer, doc) -> int:
    scores = choice_logliks(model, tokenizer, arc_context(doc), doc["choices"]["text"])
    return max(range(len(scores)), key=scores.__getitem__)
