"""A run's arguments, as LLaMA-Factory will read them: split off the ``macdrop_*`` keys, parse
LLaMA-Factory's own once (with its defaults), and run MacDrop's checks, before any model loads.

``validate_args`` runs in the launching process (``llamafactory-cli train``) and again in every
torchrun child; ``check_train_config`` adds LLaMA-Factory's own argument parser for ``macdrop
compare``'s arms. The checks themselves are plain functions over values (:mod:`..checks`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

from ..checks import SKIPPING_SWITCHES, check_skipping_switches, run_checks
from ..keys import MacDropConfig, MacDropConfigError, check_key_spelling, split_macdrop_args
from ..run_args import FIELDS_READ, RunArgs, fsdp_setup, read_run_args
from .errors import internals_error

#: what :func:`lf_defaults` reports (kept for callers of the integration module)
DEFAULTS_REPORTED = ("stage", "finetuning_type", "num_train_epochs")


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise internals_error(f"{cls.__name__} has no field '{name}'")


def lf_defaults() -> dict[str, Any]:
    """LLaMA-Factory's defaults of a few arguments (stage, finetuning_type, num_train_epochs)."""
    from llamafactory.hparams import FinetuningArguments, TrainingArguments

    owner = {
        "stage": FinetuningArguments,
        "finetuning_type": FinetuningArguments,
        "num_train_epochs": TrainingArguments,
    }
    return {name: _default(owner[name], name) for name in DEFAULTS_REPORTED}


def _fields_of(cls: type) -> type:
    """A dataclass with ``cls``'s fields (names, resolved types, defaults, help) and none of its
    ``__post_init__``: what LLaMA-Factory's parser makes of a value without building the class.
    Used for ``TrainingArguments``, whose ``__post_init__`` sets up devices, DeepSpeed and the
    distributed state (which the launching process must not do, and a torchrun child must do once)."""
    hints = typing.get_type_hints(cls)
    spec = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kw: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        spec.append((f.name, hints[f.name], dataclasses.field(**kw)))
    return dataclasses.make_dataclass(f"{cls.__name__}Fields", spec)


class _ParseError(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _parser():
    """LLaMA-Factory's train-argument parser (``hparams/parser.py``'s ``_TRAIN_ARGS``, in its order),
    with ``TrainingArguments`` read field by field (:func:`_fields_of`) and argparse's exit turned
    into an exception. The same option set as LLaMA-Factory's, so ``--key`` abbreviations and
    ``--no_key`` complements resolve as they do there."""
    from llamafactory.hparams import (
        DataArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # argparse would print its usage and exit
            raise _ParseError(message)

    return Parser(
        [ModelArguments, DataArguments, _fields_of(TrainingArguments), FinetuningArguments, GeneratingArguments]
    )


def lf_values(lf_args: Mapping[str, Any] | list[str]) -> dict[str, Any]:
    """The arguments the checks read (:data:`..run_args.FIELDS_READ`), parsed by LLaMA-Factory's own
    parser: a YAML dict is handed to its dataclasses as written (``HfArgumentParser.parse_dict``), a
    command line goes through its argparse types (``--use_dora false`` is False, a bare ``--use_dora``
    True); its defaults fill the rest and its ``__post_init__`` runs (``additional_target`` split,
    its own refusals). What LLaMA-Factory refuses is one line here, before anything loads."""
    parser = _parser()
    try:
        if isinstance(lf_args, Mapping):
            parsed = parser.parse_dict(dict(lf_args), allow_extra_keys=True)
        else:
            *parsed, _rest = parser.parse_args_into_dataclasses(args=list(lf_args), return_remaining_strings=True)
    except (_ParseError, ValueError, TypeError, AssertionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MacDropConfigError(f"LLaMA-Factory refuses it: {first}") from None
    merged: dict[str, Any] = {"use_ray": uses_ray()}  # RayArguments.__post_init__ reads USE_RAY, not the YAML
    for obj in parsed:
        merged.update({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name in FIELDS_READ})
    missing = [name for name in FIELDS_READ if name not in merged]
    if missing:
        raise internals_error(f"LLaMA-Factory's arguments have no {', '.join(missing)}")
    return merged


def run_args(lf_args: dict[str, Any] | list[str]) -> RunArgs:
    """LLaMA-Factory's arguments of this run, parsed once, by LLaMA-Factory's parser."""
    return read_run_args(lf_values(lf_args))


def fsdp_settings(
    lf_args: Mapping[str, Any] | list[str], environ: Mapping[str, str] = os.environ
) -> Optional[dict[str, Any]]:
    """The FSDP set-up (:func:`..run_args.fsdp_setup`) of a run's arguments and environment."""
    values = lf_values(lf_args) if lf_args else {"fsdp": "", "fsdp_config": None}
    return fsdp_setup(values["fsdp"], values["fsdp_config"], environ)


def uses_ray() -> bool:
    """Whether this run takes LLaMA-Factory's Ray path: its own rule (``USE_RAY`` in the environment,
    read by ``RayArguments.__post_init__``; a ``use_ray`` YAML key is not one of its arguments)."""
    from llamafactory.extras.misc import use_ray

    return bool(use_ray())


def validate_args(args: dict[str, Any] | list[str]) -> tuple[dict[str, Any] | list[str], Optional[MacDropConfig]]:
    """Split and validate; returns (LF's own args, config or None when MacDrop is off).

    Raises :class:`MacDropConfigError` with a one-line message for any bad key or combination.
    """
    check_key_spelling(args)
    lf_args, raw = split_macdrop_args(args)
    if not raw:
        return args, None
    if not MacDropConfig.switched_on(raw):  # MacDrop off: the other keys are ignored, not validated
        return lf_args, None
    config = MacDropConfig.from_raw(raw)
    check_skipping_switches(skipping_switches())
    run_checks(run_args(lf_args), config)
    return lf_args, config


def skipping_switches() -> dict[str, str]:
    """The :data:`..checks.SKIPPING_SWITCHES` set in this environment (read with LLaMA-Factory's own
    rule) and their values."""
    from llamafactory.extras.misc import is_env_enabled

    return {name: os.environ[name] for name in SKIPPING_SWITCHES if is_env_enabled(name)}


def command_line_switches_macdrop_on(argv: list[str]) -> bool:
    """Whether ``llamafactory-cli COMMAND ...`` (``argv``) turns MacDrop on, read as LLaMA-Factory's
    ``read_args`` reads it (a YAML/JSON file merged with ``key=value`` overrides by OmegaConf, else
    ``--key value`` pairs) WITHOUT importing ``llamafactory.hparams``: under ``USE_MCA=1`` without
    mcore_adapter that package refuses to import, and the switch must be refused first."""
    from omegaconf import OmegaConf

    rest = argv[2:]
    if rest and rest[0].endswith((".yaml", ".yml", ".json")):
        path = Path(rest[0]).absolute()
        loaded = (
            OmegaConf.load(path) if not rest[0].endswith(".json") else OmegaConf.create(json.loads(path.read_text()))
        )
        args = OmegaConf.to_container(OmegaConf.merge(loaded, OmegaConf.from_cli(rest[1:])))
    else:
        args = rest
    _, raw = split_macdrop_args(args if isinstance(args, (dict, list)) else {})
    try:
        return MacDropConfig.switched_on(raw)
    except MacDropConfigError:
        return True  # a bad 'macdrop' value: the full validation names it


def refuse_skipping_switches(argv: list[str]) -> None:
    """The launcher's first check: a switch that skips MacDrop's trainers, with MacDrop on, in one line."""
    enabled = skipping_switches()
    if enabled and command_line_switches_macdrop_on(argv):
        check_skipping_switches(enabled)


def check_train_config(args: dict[str, Any]) -> Optional[MacDropConfig]:
    """What ``llamafactory-cli train`` would refuse of this YAML dict, before anything trains
    (``macdrop compare`` checks every arm first): MacDrop's own checks, then LLaMA-Factory's
    argument parser (unknown keys, bad values). ``deepspeed`` is left out of the parse, because
    HF builds its DeepSpeed state there, which needs the launcher's distributed environment;
    MacDrop's checks above read that config themselves. Raises one-line errors."""
    lf_args, config = validate_args(args)
    try:
        from llamafactory.hparams.parser import _parse_train_args
    except ImportError as err:  # pragma: no cover - moved internals: the runs themselves will say it
        raise internals_error(f"llamafactory.hparams.parser._parse_train_args ({err})") from None
    probe = {k: v for k, v in dict(lf_args).items() if k != "deepspeed"}
    try:
        _parse_train_args(probe)
    except (ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MacDropConfigError(f"LLaMA-Factory refuses it: {first}") from None
    return config


def ignored_macdrop_keys(args: dict[str, Any] | list[str]) -> list[str]:
    """``macdrop_*`` keys a run without ``macdrop: true`` would silently drop (not validated)."""
    _, raw = split_macdrop_args(args)
    if not raw or MacDropConfig.switched_on(raw):
        return []
    return [k for k in raw if k != "macdrop"]


def validate_command_line(argv: list[str]) -> Optional[str]:
    """Validate ``llamafactory-cli train ...`` arguments in the launching process (a switch that
    skips MacDrop's trainers first); returns the output dir a MacDrop run will claim (None when
    MacDrop is off)."""
    refuse_skipping_switches(argv)
    from llamafactory.hparams.parser import read_args

    saved = sys.argv
    sys.argv = [argv[0]] + argv[2:]  # what run_exp will see once 'train' is popped
    try:
        args = read_args(None)
    finally:
        sys.argv = saved
    lf_args, config = validate_args(args)
    return run_args(lf_args).output_dir if config is not None else None
