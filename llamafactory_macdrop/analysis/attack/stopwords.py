"""Stop-word shift: how the next-token probability of stop words moves when the super weight is zeroed.

Why: Yu et al. find that without the super weight the model puts much more probability on stop
words ("the", ".", ",": about 2x, 5x, 10x on Llama-7B): the super activation it creates works as
a suppressor of those tokens. Measuring it tells whether a model's super weight plays that role.

What is measured: over every position of every window of a text set (each window one forward
pass, as the perplexity loop does), the mean probability the model gives each stop word as the
next token, with the model as it is and with the super weight(s) zeroed in place (restored bit for
bit afterwards); the ratio is zeroed / original. A word's probability is the sum over the token
ids that spell it alone, with and without a leading space (``"the"`` and ``" the"`` are different
tokens for byte-level BPE); a word with neither as a single token is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ...core.architectures import FFNBlock, find_ffn_blocks
from ...core.probing import JsonReport, unwrap_peft
from .attacks import AttackError, SuperWeightTarget, check_super_weights, scaled_super_weights

STOP_WORDS = ("the", ".", ",", "and", "of", "a", "to", "in", "is")


def stopword_token_ids(tokenizer: Any, words: Sequence[str]) -> dict[str, list[int]]:
    """The single-token spellings of each word (``word`` and ``" " + word``)."""
    out = {}
    for word in words:
        ids = []
        for spelling in dict.fromkeys((word, " " + word.lstrip())):
            enc = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        if not ids:
            raise AttackError(
                f"--stopword-tokens {word!r}: neither {word!r} nor {' ' + word!r} is a single token of this tokenizer"
            )
        out[word] = ids
    return out


@dataclass
class StopWordShift:
    word: str
    token_ids: list[int]
    p_original: float  # mean next-token probability over all positions
    p_zeroed: float
    ratio: float  # p_zeroed / p_original


@dataclass
class StopWordReport(JsonReport):
    schema = "macdrop.stopwords/1"
    model: str
    super_weights: list[dict[str, int]]
    texts: list[str]
    positions: int
    words: list[StopWordShift] = field(default_factory=list)
    restored_bitwise: bool = False

    def super_weight_names(self) -> str:
        return ", ".join(f"L{s['layer']}[{s['row']},{s['col']}]" for s in self.super_weights)

    def payload(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"Stop words when the super weight(s) {self.super_weight_names()} are zeroed "
            f"({self.positions} positions of {', '.join(self.texts)})",
            f"  {'word':<8} {'token ids':<16} {'p original':>11} {'p zeroed':>11} {'ratio':>8}",
        ]
        for w in self.words:
            ids = ",".join(map(str, w.token_ids))
            lines.append(f"  {repr(w.word):<8} {ids:<16} {w.p_original:11.5f} {w.p_zeroed:11.5f} {w.ratio:8.2f}")
        return "\n".join(lines)


@torch.inference_mode()
def _mean_probs(model: nn.Module, windows: Sequence[torch.Tensor], ids: list[list[int]]) -> tuple[torch.Tensor, int]:
    """Sum over positions of each word's next-token probability, and the number of positions."""
    device = unwrap_peft(model).get_input_embeddings().weight.device
    total = torch.zeros(len(ids), dtype=torch.float64, device=device)
    count = 0
    for x in windows:
        x = x.to(device)
        probs = model(input_ids=x, use_cache=False).logits.float().softmax(-1).flatten(0, 1)
        for i, word_ids in enumerate(ids):
            total[i] += probs[:, word_ids].sum().double()
        count += probs.shape[0]
    return total.cpu(), count


def stopword_shift(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    word_ids: dict[str, list[int]],
    super_weights: Sequence[SuperWeightTarget],
    blocks: Optional[Sequence[FFNBlock]] = None,
    texts: Sequence[str] = (),
    model_label: str = "",
) -> StopWordReport:
    """Mean next-token probability of each stop word, original vs super weights zeroed.

    ``windows``: input-id tensors [batch, T] (e.g. a :class:`~.perplexity.Windows`' full/tail)."""
    from ...core.storage import bits

    if not super_weights:
        raise AttackError("the stop-word shift needs a super weight (found by the probe or given as --super-weight)")
    by_index = {b.index: b for b in (blocks if blocks is not None else find_ffn_blocks(model))}
    check_super_weights(by_index, super_weights)
    columns = [by_index[sw.layer].down_target([sw.col]) for sw in super_weights]
    before = [bits(c.read()).clone() for c in columns]
    was_training = model.training
    model.eval()
    try:
        ids = list(word_ids.values())
        orig, n = _mean_probs(model, windows, ids)
        with scaled_super_weights(by_index, super_weights, 0.0):
            zeroed, _ = _mean_probs(model, windows, ids)
    finally:
        model.train(was_training)
    if not all(torch.equal(bits(c.read()), b) for c, b in zip(columns, before)):
        raise RuntimeError("super weights not restored bitwise after the stop-word measurement")
    report = StopWordReport(
        model=model_label,
        super_weights=[{"layer": s.layer, "row": s.row, "col": s.col} for s in super_weights],
        texts=list(texts),
        positions=n,
        restored_bitwise=True,
    )
    for (word, tids), po, pz in zip(word_ids.items(), (orig / n).tolist(), (zeroed / n).tolist()):
        report.words.append(StopWordShift(word, tids, po, pz, pz / po if po > 0 else float("inf")))
    return report
