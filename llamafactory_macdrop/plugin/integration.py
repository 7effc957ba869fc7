"""The documented entry point of the LLaMA-Factory seam, kept at its first path.

The seam itself is :mod:`llamafactory_macdrop.plugin.lf` (the only modules that import
LLaMA-Factory): :mod:`.lf.arguments` (validation before anything loads), :mod:`.lf.patches` (the
launcher / ``run_exp`` / ``export_model`` wrappers and the trainer swap), :mod:`.lf.templates`.
The checks are plain functions in :mod:`.checks` over :mod:`.run_args`. This module re-exports
what callers of ``llamafactory_macdrop.plugin.integration`` (and ``llamafactory_macdrop.integration``)
use: ``activate()``, ``validate_args``, ``check_train_config``, ``lf_template``, ...
"""

from .checks import SUPPORTED_STAGES, UNSUPPORTED_STAGE_REASON
from .child_errors import ERROR_FILE_ENV
from .lf.arguments import (
    check_train_config,
    fsdp_settings,
    ignored_macdrop_keys,
    lf_defaults,
    run_args,
    validate_args,
)
from .lf.errors import SUPPORTED_LLAMAFACTORY, IntegrationError
from .lf.patches import (
    TRAINER_SLOTS,
    activate,
    macdrop_trainer_class,
    macdrop_trainers,
    on_module_loaded,
    patch_launcher,
    patch_tuner,
    plugin_errors,
)
from .lf.templates import lf_template

__all__ = [
    "ERROR_FILE_ENV",
    "SUPPORTED_LLAMAFACTORY",
    "SUPPORTED_STAGES",
    "TRAINER_SLOTS",
    "UNSUPPORTED_STAGE_REASON",
    "IntegrationError",
    "activate",
    "check_train_config",
    "fsdp_settings",
    "ignored_macdrop_keys",
    "lf_defaults",
    "lf_template",
    "macdrop_trainer_class",
    "macdrop_trainers",
    "on_module_loaded",
    "patch_launcher",
    "patch_tuner",
    "plugin_errors",
    "run_args",
    "validate_args",
]
