"""Reading ``macdrop_locator.json`` back: the one reader (``macdrop summary``, a resumed run, the
pre-load check), and the resume rule that the file is authoritative for the run it belongs to."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from ..architectures import FFNBlock
from ..probing import model_name
from .result import LocatorError, LocatorResult

#: what every locator file must hold, and of which JSON type (the rest is optional: older files lack it)
_LOCATOR_REQUIRED = {"model": str, "layer": int, "indices": list, "modules": list, "source": str}
_LOCATOR_OPTIONAL = {
    "magnitudes": list,
    "median": (int, float),
    "probe_token_id": int,
    "massiveness": (int, float),
    "layers": list,
    "candidates": list,
    "warnings": list,
    "routing": list,
}


def read_locator_file(path: str | Path) -> LocatorResult:
    """The :class:`LocatorResult` in a ``macdrop_locator.json`` (a run's, or ``macdrop locate --json``'s).

    The one reader of the file (``macdrop summary`` and a resumed run): anything that is not such a
    file (unreadable, not UTF-8, not JSON, truncated, not an object, keys missing or of the wrong
    type) is a :class:`LocatorError` in one line naming the file and what is wrong."""

    def bad(why: str) -> LocatorError:
        return LocatorError(f"{path} is not a MacDrop locator file: {why}")

    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise LocatorError(f"{path} cannot be read ({err.strerror or type(err).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        ending = (
            "; the file is empty"
            if not text.strip()
            else "; it looks cut short"
            if err.pos >= len(text.rstrip())
            else ""
        )
        raise bad(f"not valid JSON ({err}{ending})") from None
    if not isinstance(data, dict):
        raise bad(f"it holds a JSON {_json_kind(data)}, not an object with the located layer and rows")
    missing = [k for k in _LOCATOR_REQUIRED if k not in data]
    if missing:
        raise bad("it has no " + ", ".join(f"'{k}'" for k in missing))
    for key, kind in {**_LOCATOR_REQUIRED, **_LOCATOR_OPTIONAL}.items():
        value = data.get(key)
        if key in _LOCATOR_OPTIONAL and value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            wanted = _json_kind(kind() if isinstance(kind, type) else 0)
            raise bad(f"'{key}' is a JSON {_json_kind(value)}, expected {'an' if wanted[0] in 'ao' else 'a'} {wanted}")
    if not data["indices"] or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in data["indices"]
    ):
        raise bad(f"'indices' is {data['indices']!r}, expected a non-empty list of row indices >= 0")
    data = {k: v for k, v in data.items() if not (k in ("layers", "candidates", "warnings", "routing") and v is None)}
    data = {**data, **{k: None for k in ("magnitudes", "median", "probe_token_id", "massiveness") if k not in data}}
    try:
        return LocatorResult.from_dict(data)
    except (TypeError, ValueError, AttributeError) as err:  # a nested entry (layers, candidates, ...) of another shape
        raise bad(f"an entry of 'layers', 'candidates' or 'routing' is not in this version's format ({err})") from None


def read_resumed_locator_file(path: str | Path) -> LocatorResult:
    """:func:`read_locator_file` for a resumed run, whose errors end with the way out."""
    try:
        return read_locator_file(path)
    except LocatorError as err:
        raise LocatorError(f"{err}: delete {path} to locate again") from None


def _json_kind(value: Any) -> str:
    names = {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def same_model(recorded: str, given: str) -> bool:
    """Whether two spellings name the same model: equal strings, the same local folder however
    written (a trailing ``/``, ``./``, ``~``, a symlink: compared resolved), or the same hub id up
    to a trailing ``/``. A folder and a hub id are different models here (a resume that switches
    from one to the other should say so)."""
    if recorded == given:
        return True

    def resolved(name: str) -> tuple[str, str]:
        folder = os.path.expanduser(name)
        if os.path.isdir(folder):
            return "folder", os.path.realpath(folder)
        return "id", name.strip().rstrip("/")

    return resolved(recorded) == resolved(given)


def model_differs(recorded: str, given: str) -> bool:
    """Whether two spellings certainly name different models BEFORE anything loads: both local
    folders (resolved) or both hub ids, and different. A folder against an id is left to the check
    on the loaded model (LLaMA-Factory may resolve an id to a downloaded folder)."""
    kinds = [os.path.isdir(os.path.expanduser(x)) for x in (recorded, given)]
    return kinds[0] == kinds[1] and not same_model(recorded, given)


def reuse_result(
    path: str | Path,
    model: nn.Module,
    blocks: Sequence[FFNBlock],
    k: int,
    layer: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
) -> LocatorResult:
    """Read a resumed run's ``macdrop_locator.json`` and check it belongs to this model and config.

    A resumed run must drop the rows the interrupted run dropped; re-deriving them could differ
    (other probe token, other dtype), so the file is authoritative, and a file written for another
    model, or contradicting macdrop_k/macdrop_layer/macdrop_indices, is refused.
    """
    fix = f"delete {path} to locate again"
    result = read_resumed_locator_file(path)
    name = model_name(model)
    if not same_model(result.model, name):
        raise LocatorError(f"{path} was written for model {result.model!r}, this run trains {name!r}: {fix}")
    by_index = {b.index: b for b in blocks}
    block = by_index.get(result.layer)
    if block is None or block.module_names(result.expert) != result.modules:
        raise LocatorError(
            f"{path} names weights {result.modules} that this model does not have at layer {result.layer}: {fix}"
        )
    if max(result.indices) >= block.intermediate_size:
        raise LocatorError(
            f"{path}: indices {result.indices} exceed the intermediate size {block.intermediate_size}: {fix}"
        )
    for key, wanted, found in (
        ("macdrop_k", k, len(result.indices)),
        ("macdrop_layer", layer, result.layer),
        ("macdrop_indices", list(indices) if indices is not None else None, result.indices),
    ):
        if wanted is not None and wanted != found:
            raise LocatorError(f"{key}={wanted} contradicts {path} ({found}) of the run being resumed: {fix}")
    return result
