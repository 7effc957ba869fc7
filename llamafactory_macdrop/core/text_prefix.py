"""What goes before a text: what the model's tokenizer itself puts there, and nothing else by default.

Why one policy: massive activations live at the FIRST token, so which token stands at position 0
decides what every measurement sees. A config's ``bos_token_id`` is not that token on many models:
a tokenizer that adds no BOS (SmolLM2's, Qwen's) while the config names one (often a document
separator such as ``<|endoftext|>``) never feeds that id first in use. Putting it there anyway
moved the clean perplexity of a real 0.5 B model of that kind from 64.1 to 97.0 and made
``macdrop superweight`` name a super weight five layers away from the real one. So every command
(perplexity windows, the probe texts of activations / superweight / attention / attack /
quantize, generation without a chat template) and the locator's "what the tokenizer puts first"
candidate ask :func:`tokenizer_prefix`: the ids the tokenizer prepends when it encodes a text
with its special tokens, which is also what lm-eval (``tok_encode``) and Sun et al.'s C4/PG-19
loaders feed.

Deviating is explicit and recorded: ``--bos none`` puts nothing first, ``--bos-token ID|TEXT``
puts that token first even where the tokenizer would not, and ``--bos stream|window`` on a
tokenizer that adds nothing is refused unless ``--bos-token`` names the token. Every report
carries :meth:`TextPrefix.protocol` (``prefix_token_id``, ``prefix_token``,
``tokenizer_adds_bos``) and a table line from :meth:`TextPrefix.describe`.

A chat template is not part of this policy: only commands that say they use one apply it
(``attack --generate``; ``macdrop locate``'s first candidate, docs/locator.md). A token the
tokenizer appends (``add_eos_token``) is not used: a window or probe text has no end of document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ..errors import MacDropError

#: texts whose encodings are compared with and without special tokens (two, so that a
#: tokenizer whose special tokens depend on the text is noticed)
_SAMPLES = ("The quick brown fox", "Hello world. 123")
PLACEMENTS = ("none", "stream", "window")


class PrefixError(MacDropError, ValueError):
    """A requested prefix the tokenizer cannot give (one line naming the option and what is allowed)."""


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if encoded and isinstance(encoded[0], (list, tuple)):
        encoded = encoded[0]
    return [int(i) for i in encoded]


def _leading(full: list[int], plain: list[int], special: set[int]) -> tuple[int, ...]:
    """The ids ``full`` (with special tokens) has before ``plain`` (without) starts."""
    n = len(plain)
    for i in range(len(full) - n + 1):
        if full[i : i + n] == plain:
            return tuple(full[:i])
    # adding special tokens changed the text's own tokens (rare): the leading special ids
    out = []
    for token in full:
        if token not in special:
            break
        out.append(token)
    return tuple(out)


def tokenizer_prefix(tokenizer: Any) -> tuple[int, ...]:
    """The token ids ``tokenizer`` puts before a text when it encodes it with special tokens
    (``()`` when it adds none, or without a tokenizer).

    Measured, not read from flags (``add_bos_token`` is missing or ignored on many tokenizers):
    the encoding of a sample text with special tokens is compared with the one without.
    """
    if tokenizer is None:
        return ()
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    found = []
    for text in _SAMPLES:
        full = _ids(tokenizer(text, add_special_tokens=True))
        plain = _ids(tokenizer(text, add_special_tokens=False))
        found.append(_leading(full, plain, special))
    # a prefix that depends on the text is not a prefix: keep what all samples share
    common = found[0]
    for other in found[1:]:
        k = 0
        while k < min(len(common), len(other)) and common[k] == other[k]:
            k += 1
        common = common[:k]
    return tuple(common)


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> Optional[str]:
    """How the tokenizer writes ``ids`` (None without a tokenizer or ids)."""
    if tokenizer is None or not ids:
        return None
    try:
        return tokenizer.decode([int(i) for i in ids])
    except Exception:  # noqa: BLE001 - a broken vocabulary entry must not stop a report
        return None


def config_bos_token_id(config: Any) -> Optional[int]:
    """``bos_token_id`` of a model config (object or config.json dict; a list's first entry; a
    multimodal config's text part), recorded when the tokenizer does NOT put it first."""
    views = [config]
    text = (
        config.get("text_config") if isinstance(config, Mapping) else getattr(config, "get_text_config", lambda: None)()
    )
    if text is not None and text is not config:
        views.append(text)
    for view in views:
        value = view.get("bos_token_id") if isinstance(view, Mapping) else getattr(view, "bos_token_id", None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


@dataclass(frozen=True)
class TextPrefix:
    """The tokens put before a text, why, and what the tokenizer itself would have put there."""

    token_ids: tuple[int, ...]  # put before the text (empty: nothing)
    text: Optional[str]  # how the tokenizer writes them
    tokenizer_ids: tuple[int, ...]  # what the tokenizer itself prepends when it encodes
    source: str  # tokenizer | none | --bos none | --bos-token | corpus protocol
    config_bos: Optional[int] = None  # the config's bos_token_id (for the record)
    config_bos_text: Optional[str] = None

    @property
    def tokenizer_adds_bos(self) -> bool:
        return bool(self.tokenizer_ids)

    def apply(self, ids: Sequence[int]) -> list[int]:
        return [*self.token_ids, *(int(i) for i in ids)]

    def without_tokens(self, source: str) -> "TextPrefix":
        """The same record with nothing put first (a protocol that places no BOS)."""
        return TextPrefix((), None, self.tokenizer_ids, source, self.config_bos, self.config_bos_text)

    def protocol(self) -> dict[str, Any]:
        """The JSON keys every protocol carries."""
        return {
            "prefix_token_id": self.token_ids[0] if self.token_ids else None,
            "prefix_token": self.text,
            "prefix_token_ids": list(self.token_ids),
            "tokenizer_adds_bos": self.tokenizer_adds_bos,
            "tokenizer_prefix_ids": list(self.tokenizer_ids),
            "prefix_source": self.source,
            "config_bos_token_id": self.config_bos,
            "prefix_summary": self.describe(),
        }

    def describe(self) -> str:
        """One line for a table header: what was put first and whether the tokenizer adds it."""
        if self.token_ids:
            shown = (
                f"{' '.join(map(str, self.token_ids))} {self.text!r}"
                if self.text is not None
                else " ".join(map(str, self.token_ids))
            )
            if self.token_ids == self.tokenizer_ids:
                why = "the tokenizer adds it"
            elif self.tokenizer_ids:
                why = f"{self.source}; the tokenizer itself adds {' '.join(map(str, self.tokenizer_ids))}"
            else:
                why = f"{self.source}; the tokenizer itself adds none"
            return f"prefix {shown} ({why})"
        if self.tokenizer_ids:
            return f"no prefix ({self.source}; the tokenizer would add {' '.join(map(str, self.tokenizer_ids))})"
        note = ""
        if self.config_bos is not None:
            shown = f" {self.config_bos_text!r}" if self.config_bos_text is not None else ""
            note = f"; config bos_token_id {self.config_bos}{shown} is not put first"
        return f"no prefix (the tokenizer adds no BOS{note})"


def _token_id(tokenizer: Any, value: int | str, option: str, vocab: Optional[int]) -> int:
    if isinstance(value, bool):
        raise PrefixError(f"{option} {value!r} is not allowed: give a token id or a token's text")
    if isinstance(value, int):
        if value < 0 or (vocab is not None and value >= vocab):
            allowed = f"0..{vocab - 1}" if vocab is not None else ">= 0"
            raise PrefixError(f"{option} {value} is not allowed: a token id is in {allowed}")
        return value
    if not str(value):
        raise PrefixError(f"{option} '' is not allowed: give a token id or a token's text")
    if tokenizer is None:
        raise PrefixError(f"{option} {value!r} needs the model's tokenizer to turn the text into a token")
    ids = _ids(tokenizer(str(value), add_special_tokens=False))
    if len(ids) != 1:
        raise PrefixError(f"{option} {value!r} is {len(ids)} tokens {ids}, not one: give one token's text or its id")
    return ids[0]


def resolve_prefix(
    tokenizer: Any,
    bos: Optional[str] = None,
    bos_token: int | str | None = None,
    *,
    config_bos: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> TextPrefix:
    """The prefix a command puts before its texts (see the module docstring).

    ``bos``: None (follow the tokenizer), ``none``, ``stream`` or ``window`` (where the prefix goes
    is the caller's business; here they only demand one). ``bos_token``: ``--bos-token``.
    ``config_bos``: the model config's ``bos_token_id``, named when the tokenizer does not add it.
    """
    if bos is not None and bos not in PLACEMENTS:
        raise PrefixError(f"--bos {bos!r} is not allowed: choose from {', '.join(PLACEMENTS)}")
    own = tokenizer_prefix(tokenizer)
    config_text = decode_ids(tokenizer, [config_bos]) if config_bos is not None else None
    record = dict(tokenizer_ids=own, config_bos=config_bos, config_bos_text=config_text)
    if bos == "none":
        if bos_token is not None:
            raise PrefixError(
                f"--bos-token {bos_token!r} with --bos none: give one of them (--bos none puts nothing first)"
            )
        return TextPrefix((), None, source="--bos none", **record)
    if bos_token is not None:
        token = _token_id(tokenizer, bos_token, "--bos-token", vocab_size)
        return TextPrefix((token,), decode_ids(tokenizer, [token]), source="--bos-token", **record)
    if own:
        return TextPrefix(own, decode_ids(tokenizer, own), source="tokenizer", **record)
    if bos in ("stream", "window"):
        named = ""
        if config_bos is not None:
            named = f" (its config names bos_token_id {config_bos}{' ' + repr(config_text) if config_text else ''}, which it never puts first)"
        raise PrefixError(
            f"--bos {bos}: this tokenizer adds no BOS{named}: give --bos-token ID|TEXT to put a token first anyway, "
            "or leave --bos out to feed the text as the tokenizer encodes it"
        )
    return TextPrefix((), None, source="none", **record)
