"""Keyword arguments of the API functions, read as the command line reads its options.

Why the command line's parser is the schema: every option has exactly one definition (name, type,
default, allowed values, help), in ``cli/<command>.py``'s ``register``. ``md.attack(path,
k_sweep=[0, 5], zeroshot=["arc_easy"])`` and ``macdrop attack PATH --k-sweep 0,5 --zeroshot
arc_easy`` then reach the same namespace through the same conversions and defaults, so the API
cannot drift from the CLI, and docs/cli.md documents both.

A keyword takes either what a user would type (a string, converted by the option's own type) or
the Python value the conversion produces (a list of ints, a Path, a bool). Lists are accepted for
the comma-separated options (``mode=["zero", "retain"]``) and for the repeatable / several-value
ones (``text_file=[a, b]``); a single value where several are allowed is one of them.
"""

from __future__ import annotations

import argparse
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import MacDropError

#: options of the command line that only say where the CLI writes or what it prints: the API
#: returns a report instead (``report.write_json(path)``, ``report.plot(folder)``, ...)
OUTPUT_OPTIONS = frozenset(
    {"json", "csv", "plot", "no_plot", "gen_items", "generate_report", "stopwords_json", "report", "title", "format"}
)


class ApiOptionError(MacDropError, TypeError):
    """A keyword the command does not have, or a value its option refuses (one line)."""


@lru_cache(maxsize=None)
def command_parser(command: str) -> argparse.ArgumentParser:
    """The ``macdrop COMMAND`` parser (built once)."""
    from ..cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _actions(command: str) -> dict[str, list[argparse.Action]]:
    out: dict[str, list[argparse.Action]] = {}
    for action in command_parser(command)._actions:
        if action.dest not in ("help", argparse.SUPPRESS):
            out.setdefault(action.dest, []).append(action)
    return out


def option_names(command: str, *, outputs: bool = False) -> list[str]:
    """The keyword names of ``command`` (its options' ``dest``), positional ones first."""
    names = list(_actions(command))
    return [n for n in names if outputs or n not in OUTPUT_OPTIONS]


def _flag(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest.upper()


def _convert_one(action: argparse.Action, value: Any) -> Any:
    """One value as the option's ``type`` would give it (strings go through the type)."""
    if isinstance(value, str) and action.type is not None:
        try:
            return action.type(value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
            raise ApiOptionError(f"{action.dest}={value!r}: {err}") from None
    if action.type is Path and value is not None:
        return Path(value)
    return value


def _is_many(value: Any) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Path, Mapping))


def convert(action: argparse.Action, value: Any) -> Any:
    """``value`` as the namespace holds it after ``--option value`` on the command line."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ApiOptionError(f"{action.dest}={value!r}: give True or False")
        return value
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        items = list(value) if _is_many(value) else [value]
        return [_convert_one(action, v) for v in items]
    if _is_many(value):
        # a comma-separated option given as a list: the comma form its type (or the command) reads
        if action.type is None or action.type in (int, float, Path):
            if action.type is not None:
                raise ApiOptionError(f"{action.dest}={value!r}: give one value ({_flag(action)} takes one)")
            return ",".join(str(v) for v in value)
        return _convert_one(action, ",".join(str(v) for v in value))
    value = _convert_one(action, value)
    if action.choices is not None and value not in action.choices:
        allowed = ", ".join(map(str, action.choices))
        raise ApiOptionError(f"{action.dest}={value!r} is not allowed: give one of {allowed}")
    return value


def cli_options(command: str, args: argparse.Namespace) -> dict[str, Any]:
    """What the command line parsed, as the API's keywords (positionals and output options left out)."""
    names = set(option_names(command)) - {a.dest for a in command_parser(command)._actions if not a.option_strings}
    return {k: v for k, v in vars(args).items() if k in names}


def _renamed(command: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Old keyword spellings (the options' old names, cli/common.py's RENAMED) as the new ones,
    with a FutureWarning once; a keyword given under both names is refused."""
    import warnings

    from ..cli.common import RENAMED

    actions = _actions(command)
    out = dict(options)
    for old, new in RENAMED.items():
        old_kw, new_kw = old[2:].replace("-", "_"), new[2:].replace("-", "_")
        if old_kw in out and old_kw not in actions and new_kw in actions:
            if new_kw in out:
                raise ApiOptionError(f"{command}() got {old_kw}= and {new_kw}=: give {new_kw}= only")
            warnings.warn(f"{command}(): {old_kw}= is now {new_kw}= (the old name still works)", FutureWarning, 3)
            out[new_kw] = out.pop(old_kw)
    return out


def namespace(command: str, positional: Mapping[str, Any], options: Mapping[str, Any]) -> argparse.Namespace:
    """The namespace ``macdrop COMMAND`` would parse: the defaults, then ``positional`` and ``options``
    converted (old keyword spellings accepted, with a warning); an unknown keyword is one line naming
    the ones allowed."""
    options = _renamed(command, options)
    actions = _actions(command)
    unknown = [k for k in options if k not in actions or k in OUTPUT_OPTIONS]
    if unknown:
        allowed = ", ".join(option_names(command)[len(positional) :])
        raise ApiOptionError(f"{command}() got an unknown option {unknown[0]!r}; allowed: {allowed}")
    ns = argparse.Namespace()
    for dest, acts in actions.items():
        setattr(ns, dest, acts[0].default)
    for dest, value in {**positional, **options}.items():
        setattr(ns, dest, convert(_pick(actions[dest], value), value) if dest in options else value)
    return ns


def _pick(actions: list[argparse.Action], value: Any) -> argparse.Action:
    """Of two flags with one dest (``--keep-partial`` / ``--drop-partial``), the one that sets ``value``."""
    if len(actions) > 1 and isinstance(value, bool):
        for action in actions:
            if isinstance(action, argparse._StoreTrueAction) and value:
                return action
            if isinstance(action, argparse._StoreFalseAction) and not value:
                return action
    return actions[0]
