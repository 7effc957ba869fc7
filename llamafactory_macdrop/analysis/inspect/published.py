"""Published positions as reference data: House-of-Cards massive weights and LLMSuperWeight super
weights, the models they belong to, and the rule that compares a located position with them.

The data is ``published_positions.json`` beside this module (sources cited in the file); users add
their own in the same format (``--published FILE`` on ``macdrop locate`` / ``macdrop superweight``,
docs/locator.md, "Published positions"). Standard library only: reading a table needs no torch.

**Which model.** An entry names the config.json fields of its model (``model_type``, the shape,
and where versions share a shape, ``max_position_embeddings`` / ``rope_theta`` / ...). A config
matches when every listed field is present with an equal value (numbers compare as numbers, so
``500000`` equals ``500000.0``); a multimodal config is also tried through its ``text_config``, and
``rope_theta`` is also read from ``rope_parameters`` (where transformers 5 writes it). Folder and
hub names are never looked at: a renamed copy matches, a fine-tune that changed a listed field
(e.g. ``vocab_size`` after adding tokens) does not.

**Layer numbering.** Sources print layers their own way (the paper counts from 1, the super-weight
code from 0); each block says so with ``layer_base`` and :func:`to_zero_based` is the one place
that turns a printed number into the 0-based HF module index used everywhere in this project.

**Matches.**

* massive weights (:func:`compare_massive`): same 0-based layer, same top-1 index, and for MoE
  entries the same expert. The overlap of the top-k is reported, not required (ranks 3-5 are
  small and move with the probe token and the dtype);
* super weights (:func:`compare_super_weights`): some located (layer, row, col) has the layer and
  the column of some published coordinate and, where the source gives the row, its row too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping, Optional, Sequence, Union

from ...errors import MacDropError

PACKAGED_FILE = "published_positions.json"
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


class PublishedFileError(MacDropError, ValueError):
    """A published-positions file that cannot be used. The message is one line: the file and what
    is wrong in it."""


def to_zero_based(layer: int, layer_base: int) -> int:
    """The source's layer number as the 0-based HF module index (``model.layers[i]``): the only
    place in this module where a numbering is converted."""
    return layer - layer_base


# --------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class MassivePosition:
    """A massive-weight position as a source publishes it (or the statement that it finds none)."""

    source: str  # short label, printed in messages ("House of Cards Table 6")
    cite: str  # full reference
    none_reported: bool = False
    layer: Optional[int] = None  # 0-based
    printed_layer: Optional[int] = None  # the number the source prints
    layer_base: Optional[int] = None  # 1: the source counts from 1
    indices: tuple[int, ...] = ()  # top-k, largest first
    expert: Optional[int] = None  # MoE: index of model.layers[l].mlp.experts
    note: str = ""

    def describe(self, model: str) -> str:
        """ "House of Cards Table 6, Meta-Llama-3-8B: layer 2 1-based = 1 0-based, top-5 [...]"."""
        if self.none_reported:
            return f"{self.source}, {model}: no massive weights reported"
        expert = f", expert {self.expert}" if self.expert is not None else ""
        return (
            f"{self.source}, {model}: layer {_numbering(self.printed_layer, self.layer_base)}{expert}, "
            f"top-{len(self.indices)} {list(self.indices)}"
        )

    def to_dict(self, model: str) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "cite": self.cite, "model": model}
        if self.none_reported:
            out["none_reported"] = True
            return out
        out["layer"] = self.layer
        if self.layer_base == 1:
            out["paper_layer"] = self.printed_layer
        out["indices"] = list(self.indices)
        if self.expert is not None:
            out["expert"] = self.expert
        return out


@dataclass(frozen=True)
class SuperWeightCoordinate:
    layer: int  # 0-based
    row: Optional[int]  # hidden dim (output of down_proj); None where the source does not give it
    col: int  # intermediate unit (input of down_proj)
    printed_layer: int

    def as_list(self) -> list[Optional[int]]:
        return [self.layer, self.row, self.col]

    def __str__(self) -> str:
        return f"({self.layer}, {'*' if self.row is None else self.row}, {self.col})"


@dataclass(frozen=True)
class SuperWeights:
    """Super-weight coordinates of ``model.layers[layer].mlp.down_proj.weight[row, col]``."""

    source: str
    cite: str
    layer_base: int
    coordinates: tuple[SuperWeightCoordinate, ...]
    note: str = ""

    def describe(self, model: str) -> str:
        coords = ", ".join(str(c) for c in self.coordinates)
        numbering = (
            "0-based"
            if self.layer_base == 0
            else "0-based; the source counts from 1: layers "
            + ", ".join(str(c.printed_layer) for c in self.coordinates)
            + " there"
        )
        return f"{self.source}, {model}: (layer, row, col) {coords}, layers {numbering}"

    def to_dict(self, model: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "cite": self.cite,
            "model": model,
            "super_weights": [c.as_list() for c in self.coordinates],
        }
        if self.layer_base == 1:
            out["paper_layers"] = [c.printed_layer for c in self.coordinates]
        return out


@dataclass(frozen=True)
class PublishedEntry:
    """One model: the config.json fields that identify it and what the sources publish for it."""

    model: str
    config: Mapping[str, Any]
    massive: Optional[MassivePosition] = None
    super_weights: Optional[SuperWeights] = None
    config_sources: tuple[str, ...] = ()
    origin: str = ""  # the file it was read from
    notes: tuple[str, ...] = field(default=(), compare=False)

    def matches(self, config: Mapping[str, Any]) -> bool:
        """Whether ``config`` (a config.json as a dict) is this model (module docstring)."""
        return any(all(_same(_field(view, k), v) for k, v in self.config.items()) for view in _views(config))

    def summary(self) -> str:
        """One line: the model and everything published for it."""
        parts = [b.describe(self.model) for b in (self.massive, self.super_weights) if b is not None]
        return "; ".join(parts)


# ------------------------------------------------------------------------------------ comparisons


@dataclass
class Comparison:
    """A located position against the published one. ``reported`` is False when the entry has no
    such position (then ``matches`` is False too); ``to_dict`` is the JSON form."""

    matches: bool
    reported: bool
    message: str
    published: dict[str, Any]
    located: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "located": self.located,
            "matches": self.matches,
            "reported": self.reported,
            **self.details,
            "message": self.message,
        }


def compare_massive(
    entry: PublishedEntry, layer0: int, indices: Sequence[int], expert: Optional[int] = None
) -> Comparison:
    """Compare a located massive layer (0-based) and its indices (largest first) with ``entry``.

    Matches when the 0-based layer, the top-1 index and, for an entry that names an expert, the
    expert are the same; ``overlap`` counts the located indices (the first k) among the published
    top-k.
    """
    indices = [int(i) for i in indices]
    located: dict[str, Any] = {"layer": int(layer0), "indices": indices}
    if expert is not None:
        located["expert"] = int(expert)
    pub = entry.massive
    top1 = indices[0] if indices else None
    if pub is None:
        return Comparison(
            False,
            False,
            f"no published massive-weight position for {entry.model} ({entry.origin})",
            {"model": entry.model},
            located,
        )
    if pub.none_reported:
        why = f" ({pub.note})" if pub.note else ""
        return Comparison(
            False,
            False,
            f"{pub.source} reports no massive weights for {entry.model}{why};"
            f" located layer {layer0} (0-based), top-1 {top1}",
            pub.to_dict(entry.model),
            located,
        )

    k = len(pub.indices)
    overlap = len(set(indices[:k]) & set(pub.indices))
    same_layer = int(layer0) == pub.layer
    same_top1 = top1 == pub.indices[0]
    same_expert = None if pub.expert is None else (expert is not None and int(expert) == pub.expert)
    matches = same_layer and same_top1 and same_expert is not False
    details = {
        "same_layer": same_layer,
        "same_top1": same_top1,
        "same_expert": same_expert,
        "overlap": overlap,
        "overlap_of": k,
    }
    where = pub.describe(entry.model)
    share = f"{overlap}/{k} of the top-{k}"
    if matches:
        exp = f", expert {expert}" if pub.expert is not None else ""
        message = f"matches the published position ({where}): layer {layer0}{exp}, top-1 {top1}, {share}"
    else:
        loc_exp = f", expert {expert}" if pub.expert is not None else ""
        pub_exp = f", expert {pub.expert}" if pub.expert is not None else ""
        message = (
            f"differs from the published position ({where}): located layer {layer0} (0-based){loc_exp},"
            f" rows {indices[:k]} vs published layer {pub.layer} (0-based){pub_exp}, rows"
            f" {list(pub.indices)}; top-1 {top1} vs {pub.indices[0]}, {share} shared"
        )
        if int(layer0) == pub.layer + 1:
            message += (
                f" (located layer {layer0} is the published layer's 1-based number; this project counts layers from 0)"
            )
    return Comparison(matches, True, message, pub.to_dict(entry.model), located, details)


def compare_super_weights(entry: PublishedEntry, located: Sequence[Sequence[int]]) -> Comparison:
    """Compare located super weights, (layer 0-based, row, col) each, with ``entry``.

    Matches when some located coordinate has the layer and column of some published coordinate
    and, where the source gives the row, the same row; ``overlap`` counts the published
    coordinates found.
    """
    found_located = [tuple(int(v) for v in c) for c in located]
    for c in found_located:
        if len(c) != 3:
            raise ValueError(f"a super weight is (layer, row, col), got {c!r}")
    loc = {"super_weights": [list(c) for c in found_located]}
    sw = entry.super_weights
    if sw is None:
        return Comparison(
            False, False, f"no published super weight for {entry.model} ({entry.origin})", {"model": entry.model}, loc
        )

    def hit(p: SuperWeightCoordinate, c: tuple[int, ...]) -> bool:
        return c[0] == p.layer and c[2] == p.col and (p.row is None or c[1] == p.row)

    found = [p for p in sw.coordinates if any(hit(p, c) for c in found_located)]
    matches = bool(found)
    details = {"found": [p.as_list() for p in found], "overlap": len(found), "overlap_of": len(sw.coordinates)}
    where = sw.describe(entry.model)
    shown = ", ".join(f"({l}, {r}, {c})" for l, r, c in found_located) or "none"
    if matches:
        message = (
            f"matches the published super weight ({where}): located {shown};"
            f" {len(found)}/{len(sw.coordinates)} of the published coordinates found"
        )
    else:
        message = (
            f"differs from the published super weight ({where}): located {shown} vs published"
            f" {', '.join(str(p) for p in sw.coordinates)} (layer 0-based, row, col)"
        )
        near = [
            c
            for c in found_located
            for p in sw.coordinates
            if c[2] == p.col and c[0] == p.layer + 1 and (p.row is None or c[1] == p.row)
        ]
        if near:
            message += (
                f" (located layer {near[0][0]} is the published layer's 1-based number; this"
                f" project counts layers from 0)"
            )
        elif any(c[0] == p.layer and c[2] == p.col for c in found_located for p in sw.coordinates):
            message += " (same layer and column, another row)"
    return Comparison(matches, True, message, sw.to_dict(entry.model), loc, details)


# -------------------------------------------------------------------------------------- matching


def matching_entries(config: Mapping[str, Any], entries: Sequence[PublishedEntry]) -> list[PublishedEntry]:
    """Every entry whose fields ``config`` has (the packaged ones never overlap: tested)."""
    return [e for e in entries if e.matches(config)]


def match_config(
    config: Mapping[str, Any], entries: Optional[Sequence[PublishedEntry]] = None
) -> Optional[PublishedEntry]:
    """The entry for ``config`` (a config.json as a dict), or None. ``entries`` defaults to the
    packaged table; when several match, the last one wins, so a user file given after the packaged
    table (:func:`load_published`) overrides it."""
    found = matching_entries(config, load_published() if entries is None else entries)
    return found[-1] if found else None


_MISSING = object()
#: where a field may sit instead of the top level of a config (transformers 5: rope_parameters)
_NESTED = {"rope_theta": ("rope_parameters",)}


def _views(config: Mapping[str, Any]):
    yield config
    text = config.get("text_config")
    if isinstance(text, Mapping):
        yield text


def _field(view: Mapping[str, Any], name: str) -> Any:
    if name in view:
        return view[name]
    for parent in _NESTED.get(name, ()):
        sub = view.get(parent)
        if isinstance(sub, Mapping) and name in sub:
            return sub[name]
    return _MISSING


def _same(actual: Any, expected: Any) -> bool:
    if actual is _MISSING:
        return False
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        return float(actual) == float(expected)
    return actual == expected


def _numbering(printed: Optional[int], base: Optional[int]) -> str:
    if base == 1:
        return f"{printed} 1-based = {to_zero_based(printed, base)} 0-based"
    return f"{printed} (0-based)"


# --------------------------------------------------------------------------------------- loading


def load_published(extra: Sequence[PathLike] = ()) -> list[PublishedEntry]:
    """The packaged entries, then those of each file in ``extra`` (same format), in order.

    A user file that cannot be used raises :class:`PublishedFileError` (a ``ValueError``) with one
    line naming the file and the problem.
    """
    entries = list(_packaged())
    for path in extra:
        entries.extend(_read_file(os.fspath(path)))
    return entries


@lru_cache(maxsize=1)
def _packaged() -> tuple[PublishedEntry, ...]:
    text = resources.files(__package__).joinpath(PACKAGED_FILE).read_text(encoding="utf-8")
    return tuple(parse_published(json.loads(text), f"{__package__}/{PACKAGED_FILE}"))


def _read_file(path: str) -> list[PublishedEntry]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise PublishedFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        msg = getattr(e, "msg", str(e))
        where = f" at line {e.lineno} column {e.colno}" if hasattr(e, "lineno") else ""
        raise PublishedFileError(f"{path}: not valid JSON ({msg}{where})") from None
    return parse_published(data, path)


_TOP_KEYS = {"version", "about", "notes", "sources", "models"}
_MODEL_KEYS = {"model", "config", "config_sources", "config_notes", "notes", "massive", "super_weights"}
_MASSIVE_KEYS = {"source", "none_reported", "layer", "layer_base", "indices", "expert", "note"}
_SW_KEYS = {"source", "layer_base", "coordinates", "note"}


def parse_published(data: Any, origin: str) -> list[PublishedEntry]:
    """Entries from the parsed JSON of a published-positions file; ``origin`` names it in errors."""

    def fail(what: str) -> PublishedFileError:
        return PublishedFileError(f"{origin}: {what}")

    if not isinstance(data, dict):
        raise fail(f"the top level must be an object with a 'models' list, got {_short(data)}")
    _known(data, _TOP_KEYS, "the top level", fail)
    if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise fail(f"version {_short(data.get('version'))} is not supported (this reader knows {FORMAT_VERSION})")
    sources = data.get("sources", {})
    if not isinstance(sources, dict) or not all(
        isinstance(s, dict) and isinstance(s.get("label"), str) and s["label"] for s in sources.values()
    ):
        raise fail("'sources' must map names to objects with a non-empty 'label' (and optionally 'cite')")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise fail("'models' must be a non-empty list of entries")
    return [_entry(m, i, sources, origin, fail) for i, m in enumerate(models)]


def _entry(m: Any, i: int, sources: dict, origin: str, fail) -> PublishedEntry:
    if not isinstance(m, dict):
        raise fail(f"models[{i}] must be an object, got {_short(m)}")
    name = m.get("model")
    if not isinstance(name, str) or not name:
        raise fail(f"models[{i}] needs a non-empty 'model' name")
    where = f"models[{i}] ({name})"
    _known(m, _MODEL_KEYS, where, fail)
    config = m.get("config")
    if not isinstance(config, dict) or not config:
        raise fail(f"{where}: 'config' must be a non-empty object of config.json fields")
    for k, v in config.items():
        if not isinstance(v, (str, int, float, bool)):
            raise fail(f"{where}: config field {k!r} must be a string, number or boolean, got {_short(v)}")
    if "massive" not in m and "super_weights" not in m:
        raise fail(f"{where}: needs 'massive' and/or 'super_weights'")
    config_sources = m.get("config_sources", [])
    if not isinstance(config_sources, list) or not all(isinstance(s, str) for s in config_sources):
        raise fail(f"{where}: 'config_sources' must be a list of strings")
    massive = _massive(m["massive"], f"{where}: massive", config, sources, fail) if "massive" in m else None
    sw = (
        _super_weights(m["super_weights"], f"{where}: super_weights", config, sources, fail)
        if "super_weights" in m
        else None
    )
    notes = tuple(str(m[k]) for k in ("config_notes", "notes") if k in m)
    return PublishedEntry(name, dict(config), massive, sw, tuple(config_sources), origin, notes)


def _massive(b: Any, where: str, config: dict, sources: dict, fail) -> MassivePosition:
    if not isinstance(b, dict):
        raise fail(f"{where} must be an object, got {_short(b)}")
    _known(b, _MASSIVE_KEYS, where, fail)
    label, cite = _source(b, where, sources, fail)
    note = str(b.get("note", ""))
    if b.get("none_reported") is True:
        extra = sorted(set(b) & {"layer", "layer_base", "indices", "expert"})
        if extra:
            raise fail(f"{where}: 'none_reported' excludes {', '.join(extra)}")
        return MassivePosition(label, cite, none_reported=True, note=note)
    if "none_reported" in b and b["none_reported"] is not False:
        raise fail(f"{where}: 'none_reported' must be true or false, got {_short(b['none_reported'])}")
    base = _layer_base(b, where, fail)
    printed = _int(b.get("layer"), f"{where}: 'layer'", fail)
    layer = _layer(printed, base, where, config, fail)
    indices = b.get("indices")
    if (
        not isinstance(indices, list)
        or not indices
        or not all(_is_int(i) and i >= 0 for i in indices)
        or len(set(indices)) != len(indices)
    ):
        raise fail(f"{where}: 'indices' must be a non-empty list of distinct integers >= 0, got {_short(indices)}")
    _below(indices, config, "intermediate_size", f"{where}: index", fail)
    expert = b.get("expert")
    if expert is not None:
        expert = _int(expert, f"{where}: 'expert'", fail)
        _below([expert], config, "num_local_experts", f"{where}: expert", fail)
    return MassivePosition(label, cite, False, layer, printed, base, tuple(indices), expert, note)


def _super_weights(b: Any, where: str, config: dict, sources: dict, fail) -> SuperWeights:
    if not isinstance(b, dict):
        raise fail(f"{where} must be an object, got {_short(b)}")
    _known(b, _SW_KEYS, where, fail)
    label, cite = _source(b, where, sources, fail)
    base = _layer_base(b, where, fail)
    coords = b.get("coordinates")
    if not isinstance(coords, list) or not coords:
        raise fail(f"{where}: 'coordinates' must be a non-empty list of [layer, row or null, col]")
    out = []
    for j, c in enumerate(coords):
        ok = (
            isinstance(c, list)
            and len(c) == 3
            and _is_int(c[0])
            and _is_int(c[2])
            and c[2] >= 0
            and (c[1] is None or (_is_int(c[1]) and c[1] >= 0))
        )
        if not ok:
            raise fail(f"{where}: coordinates[{j}] must be [layer, row or null, col] (integers), got {_short(c)}")
        layer = _layer(c[0], base, f"{where}: coordinates[{j}]", config, fail)
        _below([c[2]], config, "intermediate_size", f"{where}: coordinates[{j}] col", fail)
        if c[1] is not None:
            _below([c[1]], config, "hidden_size", f"{where}: coordinates[{j}] row", fail)
        out.append(SuperWeightCoordinate(layer, c[1], c[2], c[0]))
    return SuperWeights(label, cite, base, tuple(out), str(b.get("note", "")))


def _source(b: dict, where: str, sources: dict, fail) -> tuple[str, str]:
    key = b.get("source")
    if not isinstance(key, str) or not key:
        raise fail(f"{where}: needs a 'source' (a name from 'sources', or the citation itself)")
    if key in sources:
        return sources[key]["label"], str(sources[key].get("cite", sources[key]["label"]))
    return key, key


def _layer_base(b: dict, where: str, fail) -> int:
    base = b.get("layer_base")
    if base not in (0, 1) or isinstance(base, bool):
        raise fail(
            f"{where}: 'layer_base' must be 0 (layers counted from 0, as in HF) or 1 (from 1, as"
            f" in the paper), got {_short(base)}"
        )
    return base


def _layer(printed: int, base: int, where: str, config: dict, fail) -> int:
    layer = to_zero_based(printed, base)
    if layer < 0:
        raise fail(f"{where}: layer {printed} does not exist when layers count from {base}")
    n = config.get("num_hidden_layers")
    if _is_int(n) and layer >= n:
        raise fail(f"{where}: layer {printed} (0-based {layer}) is beyond num_hidden_layers {n}")
    return layer


def _below(values: Sequence[int], config: dict, key: str, where: str, fail) -> None:
    n = config.get(key)
    bad = [v for v in values if _is_int(n) and v >= n]
    if bad:
        raise fail(f"{where} {bad[0]} is outside 0..{n - 1} ({key} {n})")


def _int(v: Any, where: str, fail) -> int:
    if not _is_int(v):
        raise fail(f"{where} must be an integer, got {_short(v)}")
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _known(obj: dict, allowed: set, where: str, fail) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise fail(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def _short(v: Any, limit: int = 60) -> str:
    text = " ".join(repr(v).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
