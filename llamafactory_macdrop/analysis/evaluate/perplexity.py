"""Perplexity over fixed-length windows of a token stream, with Sun et al.'s protocol as default.

Why this protocol: the House-of-Cards perplexities (Table 1) follow the code of Sun et al.
(locuslab/massive-activations, ``lib/load_data.py`` + ``lib/eval_utils.py``), so the defaults
reproduce it and every knob is exposed and written into the output:

==========  ====================================  =========  =========  ============  ==========
corpus      source (hub), split                   documents  joined by  BOS           windows
==========  ====================================  =========  =========  ============  ==========
wikitext    ``wikitext`` / wikitext-2-raw-v1,      all        "\\n\\n"     none          all full
            test
c4          ``NeelNanda/c4-10k``, train            first      " "        once, at the  first 100
                                                  5000                  stream start
pg19        ``emozilla/pg19``, validation          first 5    " "        once, at the  first 100
                                                                        stream start
==========  ====================================  =========  =========  ============  ==========

The documents are joined into one text, tokenized once without special tokens, and cut into
consecutive non-overlapping windows of ``seq_len`` (4096) tokens; each window is one forward pass
from an empty cache. What goes first is what the model's TOKENIZER adds when it encodes a text
(:mod:`llamafactory_macdrop.core.text_prefix`): Sun et al. call the tokenizer on C4/PG-19 with its
special tokens (a Llama tokenizer puts BOS before the stream) and without them on WikiText, so the
table's BOS column is where the tokenizer's BOS goes: "stream" (once, before the first window),
"window" (before every window, ``seq_len - 1`` text tokens each) or none. A tokenizer that adds no
BOS gets nothing in front by default, whatever its config's ``bos_token_id`` says; ``--bos`` and
``--bos-token`` deviate on purpose, and every result names the prefix it used. Every position
except a window's first is predicted; perplexity = exp(total NLL / predicted tokens). (Sun et
al. average each window's mean NLL, which is the same number for equal-length windows.)
``drop_partial`` drops a last window shorter than ``seq_len`` (Sun et al. on wikitext); local
text files keep it by default, so a short file still gives one window.

Throughput: the stream goes to the device once, windows are views of it, the NLL is summed on
the device and read back once per corpus (one sync), the loop runs under ``torch.inference_mode``
with ``use_cache=False``: nothing per window but the forward and one cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...core.probing import unwrap_peft
from ...core.text_prefix import PLACEMENTS as BOS_POLICIES
from ...core.text_prefix import TextPrefix, resolve_prefix
from ...errors import MacDropError


class PerplexityError(MacDropError, ValueError):
    """A corpus or protocol setting that cannot be evaluated."""


@dataclass(frozen=True)
class PerplexityProtocol:
    """How a token stream becomes windows; written into every result.

    ``bos`` is what was asked (None: follow the tokenizer, ``corpus_bos`` placing the BOS the
    tokenizer adds); :func:`resolve_protocol` turns it into the placement used."""

    seq_len: int = 4096  # tokens per window (a window is one forward pass)
    bos: Optional[str] = (
        None  # none | stream (once before the stream) | window (opens every window) | None: the tokenizer's
    )
    max_windows: Optional[int] = None  # evaluate at most this many windows (None: all)
    drop_partial: bool = True  # drop a last window shorter than seq_len
    bos_token: Optional[int | str] = None  # --bos-token: this token first, even where the tokenizer adds none
    corpus_bos: str = "stream"  # where this corpus puts the tokenizer's BOS by default (Sun et al.)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise PerplexityError(f"--seq-len {self.seq_len} is not allowed: a window needs at least 2 tokens")
        if self.bos is not None and self.bos not in BOS_POLICIES:
            raise PerplexityError(f"--bos {self.bos!r} is not allowed: choose from {', '.join(BOS_POLICIES)}")
        if self.bos == "none" and self.bos_token is not None:
            raise PerplexityError(f"--bos-token {self.bos_token!r} with --bos none: give one of them")
        if self.max_windows is not None and self.max_windows < 1:
            raise PerplexityError(f"--max-windows {self.max_windows} is not allowed: give a number >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Corpus:
    """A known evaluation corpus: where it lives on the hub and the protocol Sun et al. use."""

    name: str
    path: str
    config: Optional[str]
    split: str
    max_docs: Optional[int]
    separator: str
    protocol: PerplexityProtocol

    def describe(self) -> str:
        docs = "all documents" if self.max_docs is None else f"first {self.max_docs} documents"
        return f"{self.path}{'/' + self.config if self.config else ''} {self.split} split, {docs} joined by {self.separator!r}"


CORPORA: dict[str, Corpus] = {
    "wikitext": Corpus(
        "wikitext", "wikitext", "wikitext-2-raw-v1", "test", None, "\n\n", PerplexityProtocol(corpus_bos="none")
    ),
    "c4": Corpus(
        "c4", "NeelNanda/c4-10k", None, "train", 5000, " ", PerplexityProtocol(corpus_bos="stream", max_windows=100)
    ),
    "pg19": Corpus(
        "pg19", "emozilla/pg19", None, "validation", 5, " ", PerplexityProtocol(corpus_bos="stream", max_windows=100)
    ),
}
#: local text files: encoded as the tokenizer encodes a document (its BOS, if any, once at the
#: start); a short file still counts
TEXT_FILE_PROTOCOL = PerplexityProtocol(corpus_bos="stream", drop_partial=False)


@dataclass
class TextSource:
    """A text to evaluate, its label in the results, where it came from, and its protocol."""

    name: str
    text: str
    origin: str
    protocol: PerplexityProtocol


def load_corpus(spec: str, overrides: Optional[dict[str, Any]] = None) -> TextSource:
    """``wikitext`` | ``c4`` | ``pg19`` (hub, through ``datasets``), ``NAME=DIR`` (a local copy of a
    known corpus, same protocol), or ``DIR`` (a local dataset folder with a ``text`` column).

    Local folders are read with ``datasets.load_from_disk`` (``save_to_disk`` output) or, failing
    that, ``datasets.load_dataset(DIR)`` (a folder of json/parquet/txt files).
    """
    name, _, local = spec.partition("=")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not local and name not in CORPORA:
        if Path(name).is_dir():
            text, origin = _read_local(Path(name), split=None, max_docs=None, separator="\n\n")
            return TextSource(Path(name).name, text, origin, replace(TEXT_FILE_PROTOCOL, **overrides))
        raise PerplexityError(
            f"--dataset {spec!r} is not allowed: choose from {', '.join(CORPORA)}, NAME=DIR for a local copy, or a dataset folder"
        )
    if name not in CORPORA:
        raise PerplexityError(f"--dataset {spec!r}: {name!r} is not a known corpus ({', '.join(CORPORA)})")
    corpus = CORPORA[name]
    if local:
        text, origin = _read_local(Path(local), corpus.split, corpus.max_docs, corpus.separator)
    else:
        import datasets

        data = datasets.load_dataset(corpus.path, corpus.config, split=corpus.split)
        text, origin = _join(data, corpus.max_docs, corpus.separator), f"{corpus.describe()} (hub)"
    return TextSource(name, text, origin, replace(corpus.protocol, **overrides))


def _join(data, max_docs: Optional[int], separator: str) -> str:
    if "text" not in data.column_names:
        raise PerplexityError(f"the dataset has no 'text' column (columns: {', '.join(data.column_names)})")
    rows = data if max_docs is None else data.select(range(min(max_docs, len(data))))
    return separator.join(rows["text"])


def _read_local(folder: Path, split: Optional[str], max_docs: Optional[int], separator: str) -> tuple[str, str]:
    import datasets

    if not folder.is_dir():
        raise PerplexityError(f"--dataset folder {folder} does not exist")
    try:
        data = datasets.load_from_disk(str(folder))
    except FileNotFoundError:
        data = datasets.load_dataset(str(folder))
    if isinstance(data, datasets.DatasetDict):
        chosen = split if split in data else next(iter(data))
        data = data[chosen]
    else:
        chosen = split or "(single split)"
    docs = "all documents" if max_docs is None else f"first {max_docs} documents"
    return _join(data, max_docs, separator), f"{folder} {chosen} split, {docs} joined by {separator!r} (local)"


def load_text_file(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> TextSource:
    path = Path(path)
    if not path.is_file():
        raise PerplexityError(f"--text-file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise PerplexityError(f"--text-file {path} is empty: give a file with text to evaluate")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    return TextSource(path.name, text, str(path), replace(TEXT_FILE_PROTOCOL, **overrides))


# ----------------------------------------------------------------------------- windows
@dataclass
class Windows:
    """The input windows of one corpus: ``full`` [n, seq_len] and an optional shorter ``tail``."""

    full: torch.Tensor
    tail: Optional[torch.Tensor]

    @property
    def count(self) -> int:
        return self.full.shape[0] + (self.tail is not None)

    @property
    def predicted_tokens(self) -> int:
        """Positions whose next token is scored: all but the first of each window."""
        n, length = self.full.shape
        return n * (length - 1) + (self.tail.shape[1] - 1 if self.tail is not None else 0)


def resolve_protocol(
    protocol: PerplexityProtocol,
    tokenizer: Any,
    config_bos: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> tuple[PerplexityProtocol, TextPrefix]:
    """The protocol with ``bos`` set to the placement used, and the prefix that goes there.

    No ``--bos``: the tokenizer's own prefix at the corpus's place (``corpus_bos``), nothing when
    the tokenizer adds none. ``--bos-token`` without ``--bos``: that token once before the stream
    (or where the corpus puts a BOS). ``--bos stream|window`` without a BOS from the tokenizer
    or ``--bos-token``: refused (:class:`~llamafactory_macdrop.core.text_prefix.PrefixError`)."""
    prefix = resolve_prefix(tokenizer, protocol.bos, protocol.bos_token, config_bos=config_bos, vocab_size=vocab_size)
    if not prefix.token_ids:
        return replace(protocol, bos="none"), prefix
    if protocol.bos is not None:
        return replace(protocol, bos=protocol.bos), prefix
    placement = protocol.corpus_bos
    if prefix.source == "--bos-token" and placement == "none":
        placement = "stream"
    if placement == "none":
        return replace(protocol, bos="none"), prefix.without_tokens(
            "corpus protocol: no BOS on this corpus, as Sun et al."
        )
    return replace(protocol, bos=placement), prefix


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one 1-D stream of token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def make_windows(
    stream: torch.Tensor, protocol: PerplexityProtocol, prefix: Sequence[int] | int | None = ()
) -> Windows:
    """Cut a 1-D token stream into the protocol's windows (views of it where possible).

    ``protocol.bos`` is the placement (``none``/``stream``/``window``, see :func:`resolve_protocol`)
    of ``prefix``, the token ids put first (one id or several)."""
    prefix = [prefix] if isinstance(prefix, int) else [int(t) for t in (prefix or ())]
    placement = protocol.bos if protocol.bos is not None else (protocol.corpus_bos if prefix else "none")
    if placement != "none" and not prefix:
        raise PerplexityError(
            f"--bos {placement} needs a token to put first, and none was given: use --bos none or --bos-token"
        )
    if placement == "none":
        prefix = []
    head = torch.tensor(prefix, dtype=stream.dtype, device=stream.device)
    if placement == "stream":
        stream = torch.cat([head, stream])
    body = protocol.seq_len - (len(prefix) if placement == "window" else 0)  # text tokens per window
    if body < 1:
        raise PerplexityError(
            f"--seq-len {protocol.seq_len} leaves no room for text after the {len(prefix)} prefix token(s)"
        )
    n_full = stream.numel() // body
    if protocol.max_windows is not None:
        n_full = min(n_full, protocol.max_windows)
    full = stream[: n_full * body].view(n_full, body)
    rest = stream[n_full * body :]
    room = protocol.max_windows is None or n_full < protocol.max_windows
    opens = len(prefix) if placement == "window" else 0
    keep_tail = room and not protocol.drop_partial and rest.numel() > 0 and rest.numel() + opens >= 2
    tail = rest.unsqueeze(0) if keep_tail else None
    if placement == "window":
        full = torch.cat([head.expand(n_full, len(prefix)), full], dim=1)
        tail = torch.cat([head.view(1, -1), tail], dim=1) if tail is not None else None
    if full.shape[0] == 0 and tail is None:
        raise PerplexityError(
            f"the text has {stream.numel()} tokens, fewer than one window of {protocol.seq_len}: "
            "lower --seq-len or keep the partial window (--keep-partial)"
        )
    return Windows(full, tail)


@dataclass
class PerplexityResult:
    """Perplexity of one corpus under one attack setting."""

    dataset: str
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seconds: float
    #: per window (``per_window=True``): summed NLL and predicted tokens, for paired statistics
    window_nll: Optional[tuple[float, ...]] = None
    window_tokens: Optional[tuple[int, ...]] = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.window_nll is None:
            out.pop("window_nll"), out.pop("window_tokens")
        return out


@torch.inference_mode()
def evaluate_perplexity(
    model: nn.Module,
    windows: Windows,
    name: str = "",
    batch_size: int = 1,
    progress: bool = True,
    per_window: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` over ``windows``; ``batch_size`` full windows per forward pass.

    ``per_window`` also returns each window's summed NLL (still one read-back per corpus), which
    ``macdrop compare`` resamples for its paired intervals."""
    import time

    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = unwrap_peft(model).get_input_embeddings().weight.device
    full = windows.full.to(device)
    tail = windows.tail.to(device) if windows.tail is not None else None
    chunks = (list(full.split(max(1, batch_size))) if full.shape[0] else []) + ([tail] if tail is not None else [])
    total = torch.zeros((), dtype=torch.float64, device=device)
    sums: list[torch.Tensor] = []
    start = time.perf_counter()
    try:
        for x in tqdm(chunks, desc=f"perplexity {name}".strip(), unit="batch", disable=not progress, leave=False):
            logits = model(input_ids=x, use_cache=False).logits
            if per_window:
                per = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none")
                sums.append(per.view(x.shape[0], -1).double().sum(dim=1))
            else:
                total += F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum"
                ).double()
        window_nll = tuple(torch.cat(sums).tolist()) if per_window else None  # the one sync
        nll_sum = math.fsum(window_nll) if per_window else float(total)
    finally:
        model.train(was_training)
    tokens = windows.predicted_tokens
    nll = nll_sum / tokens
    window_tokens = None
    if per_window:
        window_tokens = (windows.full.shape[1] - 1,) * windows.full.shape[0] + (
            (windows.tail.shape[1] - 1,) if windows.tail is not None else ()
        )
    return PerplexityResult(
        name, math.exp(nll), nll, tokens, windows.count, time.perf_counter() - start, window_nll, window_tokens
    )
