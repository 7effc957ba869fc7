"""The ``macdrop_*`` keys: one typed, validated config object.

Keys arrive from a LLaMA-Factory YAML (native YAML types), from ``key=value`` overrides (parsed by
OmegaConf) or from ``--key value`` command-line pairs (strings). :func:`split_macdrop_args`
removes them from LLaMA-Factory's argument set (LF would reject them) and
:func:`MacDropConfig.from_raw` validates them before anything is loaded. Every error is a single
line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, Optional, Union

from ..core.values import comma_list, parse_flag
from ..errors import MacDropError

#: the allowed values ARE the annotations (typing.get_args reads them back), as LLaMA-Factory's hparams do
Curriculum = Literal["step", "epoch_before", "epoch_after", "exp", "constant"]
Scope = Literal["massive", "all", "non_massive"]
MaskPer = Literal["optimizer_step", "micro_batch"]
CURRICULA = typing.get_args(Curriculum)
SCOPES = typing.get_args(Scope)
MASK_PER = typing.get_args(MaskPer)
KEY_PREFIX = "macdrop"


class MacDropConfigError(MacDropError, ValueError):
    """A bad ``macdrop_*`` key or value; the message is one line meant for the user."""


@dataclass(frozen=True)
class MacDropConfig:
    """All MacDrop settings of one training run (field name == YAML key)."""

    macdrop: bool = field(default=False, metadata={"help": "Turn MacDrop on for this run."})
    macdrop_k: int = field(
        default=5, metadata={"help": "Number of massive rows (top-k intermediate dimensions) to drop."}
    )
    macdrop_p0: float = field(default=0.8, metadata={"help": "Initial dropout probability, in [0, 1]."})
    macdrop_curriculum: Curriculum = field(
        default="step", metadata={"help": f"How p decays over training: one of {', '.join(CURRICULA)}."}
    )
    macdrop_alpha: float = field(
        default=0.01, metadata={"help": "Decay rate of the exp curriculum, p = p0*exp(-alpha*t); > 0."}
    )
    macdrop_scope: Scope = field(
        default="massive",
        metadata={"help": "Which rows of W_up/W_gate at the massive layer get dropout: " + ", ".join(SCOPES)},
    )
    macdrop_layer: Optional[int] = field(
        default=None, metadata={"help": "0-based layer index; overrides the located layer."}
    )
    macdrop_indices: Optional[tuple[int, ...]] = field(
        default=None, metadata={"help": "Row indices (largest first); override the located top-k."}
    )
    macdrop_mask_per: MaskPer = field(
        default="optimizer_step",
        metadata={
            "help": "optimizer_step: one keep-mask per optimizer step for all micro-batches and ranks "
            "(split-independent); micro_batch: a fresh mask per micro-batch (depends on the batch split)."
        },
    )
    macdrop_probe_token: Optional[Union[int, str]] = field(
        default=None,
        metadata={
            "help": "Token fed alone to locate (id, or text whose first token is used); default: the first batch's first token, then BOS, then EOS."
        },
    )

    def __post_init__(self) -> None:
        for key, allowed in _choices().items():  # the Literal-typed keys
            value = getattr(self, key)
            if value not in allowed:
                _fail(key, value, "one of " + ", ".join(allowed), suggest_from=allowed)
        if not 0.0 <= self.macdrop_p0 <= 1.0:
            _fail("macdrop_p0", self.macdrop_p0, "a float in [0, 1]")
        if not (self.macdrop_alpha > 0 and math.isfinite(self.macdrop_alpha)):
            _fail("macdrop_alpha", self.macdrop_alpha, "a finite float > 0")
        if self.macdrop_layer is not None and self.macdrop_layer < 0:
            _fail("macdrop_layer", self.macdrop_layer, "null or a 0-based layer index >= 0")
        if self.macdrop_indices is not None:
            indices = self.macdrop_indices
            if len(indices) == 0:
                _fail("macdrop_indices", list(indices), "null or a non-empty list of row indices")
            if any(i < 0 for i in indices):
                _fail("macdrop_indices", list(indices), "row indices >= 0")
            if len(set(indices)) != len(indices):
                _fail("macdrop_indices", list(indices), "distinct row indices (found duplicates)")
        if self.macdrop_k < 1:
            _fail("macdrop_k", self.macdrop_k, "an integer >= 1")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> "MacDropConfig":
        """Validate raw ``macdrop_*`` values (YAML types or command-line strings)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise MacDropConfigError(f"unknown key '{key}'{hint} Allowed macdrop keys: {', '.join(known)}")
            values[key] = _coerce(key, value)
        if "macdrop_indices" in values and values["macdrop_indices"] is not None:
            indices = values["macdrop_indices"]
            n = len(indices)
            problems = []
            if len(set(indices)) != n:  # named with the mismatch, not hidden behind it
                problems.append(
                    f"macdrop_indices={list(indices)!r} is not allowed: expected distinct row indices (found duplicates)"
                )
            if "macdrop_k" in values and values["macdrop_k"] != n:
                problems.append(
                    f"macdrop_k={values['macdrop_k']} disagrees with macdrop_indices (length {n}): "
                    "give one of them, or make them agree"
                )
            if problems:
                raise MacDropConfigError("; ".join(problems))
            values["macdrop_k"] = n
        return cls(**values)

    @staticmethod
    def switched_on(raw: dict[str, Any]) -> bool:
        """Whether raw ``macdrop*`` values turn MacDrop on: ``macdrop`` alone decides (and must be a
        bool). With MacDrop off the other keys are not validated: the run ignores them."""
        return "macdrop" in raw and _coerce("macdrop", raw["macdrop"])

    # ------------------------------------------------------------------ helpers
    @property
    def enabled(self) -> bool:
        return self.macdrop

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["macdrop_indices"] is not None:
            out["macdrop_indices"] = list(out["macdrop_indices"])
        return out

    @classmethod
    def key_reference(cls) -> list[tuple[str, str, Any, str]]:
        """(key, type, default, help) for every key: the single source of the docs table."""
        rows = []
        for f in fields(cls):
            default = None if f.default is MISSING else f.default
            rows.append((f.name, _kinds()[f.name], default, f.metadata["help"]))
        return rows


def _type_name(hint: Any) -> str:
    """How the docs and the errors spell a field's type: bool, int, float, str, list[int], ``| null``."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is Union:  # in a fixed order: typing caches equal Unions, so int | str may come back as str | int
        order = ("bool", "int", "float", "str")
        names = sorted(
            (_type_name(a) for a in args if a is not type(None)),
            key=lambda n: order.index(n) if n in order else len(order),
        )
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin is Literal:
        return "str"
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    return hint.__name__


@functools.lru_cache(maxsize=None)
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(MacDropConfig)


@functools.lru_cache(maxsize=None)
def _kinds() -> dict[str, str]:
    """Field -> type name, read from the annotations (the single source of the keys' types)."""
    return {name: _type_name(hint) for name, hint in _hints().items()}


@functools.lru_cache(maxsize=None)
def _choices() -> dict[str, tuple[str, ...]]:
    """Literal-typed fields -> their allowed values."""
    return {name: typing.get_args(hint) for name, hint in _hints().items() if typing.get_origin(hint) is Literal}


def _fail(key: str, value: Any, allowed: str, suggest_from: tuple[str, ...] = ()) -> None:
    hint = ""
    if suggest_from and isinstance(value, str):
        close = difflib.get_close_matches(value, suggest_from, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise MacDropConfigError(f"{key}={value!r} is not allowed: expected {allowed}{hint}")


_ASCII_INT = re.compile(r"[+-]?[0-9]+")
_NULL = {"null", "none", "~"}  # not "": an empty value is refused, not read as null


class _BareFlag:
    """A ``--macdrop_...`` command-line key with no value after it (``--macdrop`` alone is true)."""

    def __repr__(self) -> str:
        return "(no value)"


BARE_FLAG = _BareFlag()


def _coerce(key: str, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's type, or fail with one line."""
    kind = _kinds()[key]
    if value is BARE_FLAG:
        if kind == "bool":
            return True
        raise MacDropConfigError(f"--{key} was given without a value: expected {kind} after it (e.g. --{key} VALUE)")
    if isinstance(value, str):
        text = value.strip()
        if kind.endswith("| null") and text.lower() in _NULL:
            return None
    else:
        text = None
    if value is None:
        if kind.endswith("| null"):
            return None
        _fail(key, value, f"a value of type {kind}")
    if kind == "bool":
        flag = parse_flag(value) if isinstance(value, (bool, str)) else None  # YAML's 1 is an int: refused
        if flag is None:
            _fail(key, value, "true or false")
        return flag
    if kind in ("int", "int | null"):
        return _as_int(key, value)
    if kind == "int | str | null":  # a token id, or a text ("1" on the command line is the id 1)
        if isinstance(value, bool):
            _fail(key, value, "a token id or a text")
        if isinstance(value, int) or (text is not None and _ASCII_INT.fullmatch(text)):  # "٣", "²": texts
            token = _as_int(key, value)
            if token < 0:
                _fail(key, value, "a token id >= 0 or a text")
            return token
        if isinstance(value, str) and value != "":
            return value  # keep the text as written (spaces matter to tokenizers)
        _fail(key, value, "a token id >= 0, a non-empty text, or null")
    if kind == "float":
        if isinstance(value, bool):
            _fail(key, value, "a number")
        try:
            return float(text if text is not None else value)
        except (TypeError, ValueError):
            _fail(key, value, "a number")
    if kind == "str":
        if text is None:
            _fail(key, value, "a string")
        return text
    if kind == "list[int] | null":
        if text is not None:  # "1,2,3" or "[1, 2, 3]" from the command line
            items = comma_list(text.strip("[]"))
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            _fail(key, value, "a list of integers, e.g. [1229, 1487] or 1229,1487")
        return tuple(_as_int(key, item) for item in items)
    raise AssertionError(kind)


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        _fail(key, value, "an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _ASCII_INT.fullmatch(value.strip()):  # int() would also take "٣" as 3
        return int(value.strip())
    _fail(key, value, "an integer (ASCII digits)")
    raise AssertionError  # unreachable


# ---------------------------------------------------------------------- argument splitting
def is_macdrop_key(key: str) -> bool:
    return key == KEY_PREFIX or key.startswith(KEY_PREFIX + "_")


def check_key_spelling(args: dict[str, Any] | list[str]) -> None:
    """A key that is a macdrop key written with dashes or capitals (``macdrop-k``, ``MACDROP_K``,
    ``--macdrop-k``): one line naming the spelling to use, instead of LLaMA-Factory's 'keys are not
    used' traceback (or, were MacDrop to accept it, two spellings of one key)."""
    names = (
        [str(k) for k in args]
        if isinstance(args, dict)
        else [a[2:].split("=", 1)[0] for a in args if isinstance(a, str) and a.startswith("--")]
    )
    for name in names:
        spelled = name.strip().lower().replace("-", "_")
        if spelled != name and is_macdrop_key(spelled):
            known = [f.name for f in fields(MacDropConfig)]
            close = difflib.get_close_matches(spelled, known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"macdrop keys are: {', '.join(known)}"
            raise MacDropConfigError(f"unknown key '{name}': {hint} (macdrop keys are lower case, with underscores)")


def split_macdrop_args(args: dict[str, Any] | list[str]) -> tuple[dict[str, Any] | list[str], dict[str, Any]]:
    """Separate ``macdrop*`` keys from LLaMA-Factory's own arguments.

    ``args`` is what ``llamafactory.hparams.read_args`` returns: a dict (YAML/JSON + overrides) or
    a list of command-line strings (``--key value``, ``--key=value``, or a bare ``--macdrop``
    flag). Returns (LF's arguments without macdrop keys, raw macdrop values). The input is not
    modified.
    """
    if isinstance(args, dict):
        rest = {k: v for k, v in args.items() if not is_macdrop_key(str(k))}
        raw = {str(k): v for k, v in args.items() if is_macdrop_key(str(k))}
        return rest, raw
    rest_list: list[str] = []
    raw = {}
    i = 0
    while i < len(args):
        item = args[i]
        name = item[2:] if item.startswith("--") else None
        if name is not None and is_macdrop_key(name.split("=", 1)[0]):
            if "=" in name:
                key, value = name.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = name, args[i + 1]
                i += 1
            else:  # bare flag: --macdrop alone is true, any other key needs its value (checked in _coerce)
                key = name
                value = "true" if _kinds().get(key) == "bool" else BARE_FLAG
            raw[key] = value
        else:
            rest_list.append(item)
        i += 1
    return rest_list, raw
