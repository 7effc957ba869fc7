"""Reference metrics: how close a generated answer is to the gold one(s), per item and per task.

=============== ====== ====================================================================
metric          scale  what it is
=============== ====== ====================================================================
number_match    0/1    GSM8K: the final number of the answer (:func:`extract_number`) equals
                       a gold number as a number ("18.00" = "18", "1,450,000" = "1450000")
exact_match     0/1    the SQuAD-normalized answer (:func:`normalize_answer`) equals a
                       normalized gold answer
f1              0..1   SQuAD's token F1 of the normalized answer and gold, best gold
rouge_l         0..1   ROUGE-L F-measure (``rouge_score``, Porter stemmer, its own tokenizer,
                       which keeps ASCII letters and digits only), best reference
chrf            0..100 sentence chrF (``sacrebleu.sentence_chrf``, its defaults)
bleu            0..100 sentence BLEU (``sacrebleu.sentence_bleu``, its defaults: exp smoothing)
=============== ====== ====================================================================

Several gold answers: the best score over them (SQuAD's and NQ-open's rule; chrF and BLEU take
the references together, as sacrebleu does). An item with several turns scores each turn that has
a reference and takes the mean; an item without any reference gets no score for that metric
(``None``), and a task's aggregate counts only items with one (``n``). BLEU here is the mean of
sentence BLEU over items (per-item scores are what a paired comparison needs), which is not
corpus BLEU.

GSM8K's answer extraction (the usual rule, as lm-eval's ``strict``/``flexible`` filters and
OLMES' ``regexes_to_ignore`` do it): the text after the LAST "####" if there is one, its first
number; otherwise the last number anywhere in the text. A number: an optional minus sign (not
one that follows a letter or digit, so "5-3" is 5 and 3; "-" or "\u2212"), an optional "$", digits with optional
thousands commas ("1,450,000"; "1,2,3" is three numbers), an optional decimal part; a trailing
"." (end of sentence) is not part of it. No number: no match (0).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Callable, Mapping, Optional, Sequence

_NUMBER = re.compile(r"(?<![\w.])([-\u2212])?\$?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


# ----------------------------------------------------------------------------- GSM8K
def _numbers(text: str) -> list[str]:
    out = []
    for sign, whole, decimals in _NUMBER.findall(text):
        out.append(("-" if sign else "") + whole.replace(",", "") + (decimals or ""))
    return out


def extract_number(text: str) -> Optional[str]:
    """The final answer's number as a plain string ("-1450000", "3.5"), or None (module docstring)."""
    if "####" in text:
        after = _numbers(text.rsplit("####", 1)[1])
        if after:
            return after[0]
    found = _numbers(text)
    return found[-1] if found else None


def _as_number(text: str) -> Optional[Decimal]:
    found = _numbers(text)
    if not found:
        return None
    try:
        return Decimal(found[0])
    except InvalidOperation:
        return None


def number_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the prediction's final number equals one gold number, else 0.0."""
    got = extract_number(prediction)
    if got is None:
        return 0.0
    value = Decimal(got)
    return float(any(_as_number(g) == value for g in golds))


# ----------------------------------------------------------------------------- SQuAD
def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, drop punctuation, drop the articles a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # SQuAD v2's rule: both empty is a match, one empty is not
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)


# ----------------------------------------------------------------------------- libraries
@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, golds: Sequence[str]) -> float:
    return max((_rouge().score(g, prediction)["rougeL"].fmeasure for g in golds), default=0.0)


def chrf(prediction: str, golds: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(prediction, list(golds)).score)


def bleu(prediction: str, golds: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, list(golds)).score)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "number_match": number_match,
    "exact_match": exact_match,
    "f1": token_f1,
    "rouge_l": rouge_l,
    "chrf": chrf,
    "bleu": bleu,
}


def needle_match(prediction: str, golds: Sequence[str]) -> float:
    """The long-context probe's score (needle.py: the first number said is the key)."""
    from .needle import needle_match as match

    return match(prediction, golds)


METRICS["needle_match"] = needle_match


def metric(name: str) -> Callable[[str, Sequence[str]], float]:
    """A metric by name: :data:`METRICS`, or LongBench's (``longbench_*``: lm-eval's functions, longbench.py)."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith("longbench_"):
        from .longbench import metric as longbench_metric

        return longbench_metric(name)
    raise ValueError(f"unknown metric {name}; known: {', '.join(METRICS)} and longbench_*")


# ----------------------------------------------------------------------------- items and tasks
def score_turns(
    metrics: Sequence[str], outputs: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, Optional[float]]:
    """Each metric over the turns that have references (mean), None where no turn has one."""
    functions = {name: metric(name) for name in metrics}
    scored = [(out, golds) for out, golds in zip(outputs, references) if golds]
    out: dict[str, Optional[float]] = {}
    for name in metrics:
        values = [functions[name](text, list(golds)) for text, golds in scored]
        out[name] = sum(values) / len(values) if values else None
    return out


def score_item(metrics: Sequence[str], item: Any, result: Any) -> dict[str, Optional[float]]:
    """:func:`score_turns` of a task item (``.references``) and its generation result (``.turns``)."""
    return score_turns(metrics, [t.text for t in result.turns], item.references)


def aggregate(per_item: Sequence[Mapping[str, Optional[float]]]) -> dict[str, dict[str, float]]:
    """Per metric: the mean over the items that have a score, and how many they are (``n``)."""
    names = list(dict.fromkeys(name for scores in per_item for name in scores))
    out = {}
    for name in names:
        values = [s[name] for s in per_item if s.get(name) is not None]
        out[name] = {"mean": sum(values) / len(values) if values else float("nan"), "n": len(values)}
    return out
