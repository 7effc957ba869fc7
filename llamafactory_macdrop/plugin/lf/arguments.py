"""A run's arguments, as LLaMA-Factory will read them: split off the ``macdrop_*`` keys, parse
LLaMA-Factory's own once (with its defaults), and run MacDrop's checks, before any model loads.

``validate_args`` runs in the launching process (``llamafactory-cli train``) and again in every
torchrun child; ``check_train_config`` adds LLaMA-Factory's own argument parser for ``macdrop
compare``'s arms. The checks themselves are plain functions over values (:mod:`..checks`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from ..checks import SKIPPING_SWITCHES, check_skipping_switches, run_checks
from ..keys import MacDropConfig, MacDropConfigError, split_macdrop_args
from ..run_args import DEFAULTS_NEEDED, RunArgs, read_run_args
from .errors import internals_error


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise internals_error(f"{cls.__name__} has no field '{name}'")


def lf_defaults() -> dict[str, Any]:
    """LLaMA-Factory's defaults for the arguments MacDrop's checks read (:data:`..run_args.DEFAULTS_NEEDED`)."""
    from llamafactory.hparams import FinetuningArguments, TrainingArguments

    owner = {
        "stage": FinetuningArguments,
        "finetuning_type": FinetuningArguments,
        "num_train_epochs": TrainingArguments,
    }
    return {name: _default(owner[name], name) for name in DEFAULTS_NEEDED}


def run_args(lf_args: dict[str, Any] | list[str]) -> RunArgs:
    """LLaMA-Factory's arguments of this run, parsed once."""
    return read_run_args(lf_args, lf_defaults())


def uses_ray() -> bool:
    """Whether this run takes LLaMA-Factory's Ray path: its own rule (``USE_RAY`` in the environment,
    read by ``RayArguments.__post_init__``; a ``use_ray`` YAML key is not one of its arguments)."""
    from llamafactory.extras.misc import use_ray

    return bool(use_ray())


def validate_args(args: dict[str, Any] | list[str]) -> tuple[dict[str, Any] | list[str], Optional[MacDropConfig]]:
    """Split and validate; returns (LF's own args, config or None when MacDrop is off).

    Raises :class:`MacDropConfigError` with a one-line message for any bad key or combination.
    """
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


def validate_command_line(argv: list[str]) -> None:
    """Validate ``llamafactory-cli train ...`` arguments in the launching process."""
    refuse_skipping_switches(argv)
    from llamafactory.hparams.parser import read_args

    saved = sys.argv
    sys.argv = [argv[0]] + argv[2:]  # what run_exp will see once 'train' is popped
    try:
        args = read_args(None)
    finally:
        sys.argv = saved
    validate_args(args)
