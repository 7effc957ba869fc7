"""What MacDrop changes in LLaMA-Factory, and when (tested against llamafactory 0.9.5).

Lifecycle, as seen from ``llamafactory-cli train x.yaml``:

1. ``llamafactory.launcher`` loads -> :func:`patch_launcher` wraps ``launch`` so that, for the
   ``train`` command, the ``macdrop_*`` keys are validated in the launching process, before any
   model is loaded and before torchrun starts children; a bad key ends the command with one line.
2. ``llamafactory.train.tuner`` loads (in the single process, or in every torchrun child) ->
   :func:`patch_tuner` wraps ``run_exp``: it removes the ``macdrop_*`` keys (LLaMA-Factory rejects
   unknown keys), validates them into a :class:`MacDropConfig`, and for the duration of the run
   swaps the stage's trainer class for a subclass with :class:`MacDropTrainerMixin` in front.
   ``export_model`` is wrapped to ignore ``macdrop_*`` keys, so they may stay in an export YAML.
3. Under LLaMA-Factory's Ray path (``USE_RAY=1``) ``run_exp`` runs in the driver, which trains
   nothing: it starts ``ray_num_workers`` Ray actors, each calling ``tuner._training_function`` in
   its own interpreter (where the start-up hook patched the tuner as in a torchrun child). The
   driver validates the keys and hands them on with the run's arguments; the wrapped
   ``_training_function`` (:func:`_wrap_training_function`) splits them off and swaps the
   trainer class in each worker.

Both patches are triggered by the ``.pth`` start-up hook (``plugin.startup``); :func:`activate` applies
them in-process for notebooks and tests. If LLaMA-Factory's internals are not where this module
expects them, a MacDrop run fails with the version found and the version supported; runs without
``macdrop_*`` keys are passed through untouched. A torchrun child's plugin error ends the job in
one line (:mod:`..child_errors`).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from .. import child_errors
from ..keys import MacDropConfig, split_macdrop_args
from ..output_dir import claimed
from .arguments import ignored_macdrop_keys, refuse_skipping_switches, uses_ray, validate_args, validate_command_line
from .errors import SUPPORTED_LLAMAFACTORY, internals_error, lf_version

#: stage -> (module, attribute) of the trainer class its workflow instantiates. sft/pt import the
#: class at module level in workflow.py; dpo imports it from dpo/trainer.py inside run_dpo.
TRAINER_SLOTS = {
    "sft": ("llamafactory.train.sft.workflow", "CustomSeq2SeqTrainer"),
    "pt": ("llamafactory.train.pt.workflow", "CustomTrainer"),
    "dpo": ("llamafactory.train.dpo.trainer", "CustomDPOTrainer"),
}
_PATCHED = "__macdrop_patched__"
#: set by the patched launcher for its torchrun children: the first rank to fail on a plugin
#: error leaves its message there (:mod:`..child_errors`)
ERROR_FILE_ENV = child_errors.ERROR_FILE_ENV


def plugin_errors() -> tuple[type, ...]:
    """The exceptions that are MacDrop's own verdicts: printed as one line, not a traceback."""
    from ...errors import MacDropError

    return (MacDropError,)


# ----------------------------------------------------------------------------- trainer swap
def macdrop_trainer_class(base: type, config: MacDropConfig) -> type:
    """``base`` with the MacDrop mixin in front, carrying ``config``: the host-independent
    :func:`~llamafactory_macdrop.integrations.transformers.trainer.with_macdrop`, as any host uses it."""
    from ...integrations.transformers.trainer import with_macdrop

    return with_macdrop(base, config=config)


@contextmanager
def macdrop_trainers(config: MacDropConfig, stage: str) -> Iterator[type]:
    """Swap the stage's trainer class for the MacDrop one while the run lasts."""
    module_name, attr = TRAINER_SLOTS[stage]
    try:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise internals_error(f"{module_name}.{attr} not found ({err})") from err
    if not hasattr(original, "training_step"):
        raise internals_error(f"{module_name}.{attr} is not a transformers Trainer")
    patched = macdrop_trainer_class(original, config)
    setattr(module, attr, patched)
    try:
        yield patched
    finally:
        setattr(module, attr, original)


# ----------------------------------------------------------------------------- patches
def _wrap_run_exp(original, read_args):
    @functools.wraps(original)
    def run_exp(args: Optional[dict[str, Any]] = None, callbacks: Optional[list] = None) -> None:
        child = args is None and child_errors.torchrun_child()  # the command line's run, not a caller's
        try:
            return _run_exp(original, read_args(args), callbacks, watch=child)
        except Exception as err:
            if child and isinstance(err, plugin_errors()):
                child_errors.end_child_with(err)
            if child and child_errors.peer_failed():
                child_errors.end_child_with(None)
            raise

    setattr(run_exp, _PATCHED, True)
    return run_exp


def _run_exp(original, args: dict[str, Any] | list[str], callbacks: Optional[list], watch: bool = False) -> None:
    """``watch``: a torchrun child's command-line run, which watches for its peers' plugin errors."""
    lf_args, config = validate_args(args)
    if config is None:
        ignored = ignored_macdrop_keys(args)
        if ignored and os.environ.get("RANK", "0") == "0":
            from ...integrations.transformers.trainer import logger

            logger.warning(
                "MacDrop is off (no macdrop: true), so these keys are ignored (not checked): %s", ", ".join(ignored)
            )
        return original(lf_args, callbacks)
    from ...integrations.transformers.trainer import logger

    if watch:
        child_errors.start_watcher()
    from .arguments import run_args

    parsed = run_args(lf_args)
    stage = parsed.stage
    if lf_version() != SUPPORTED_LLAMAFACTORY:
        logger.warning("tested with llamafactory==%s, found %s", SUPPORTED_LLAMAFACTORY, lf_version())
    logger.info(
        "MacDrop on: stage=%s k=%d p0=%g curriculum=%s%s scope=%s mask_per=%s",
        stage,
        config.macdrop_k,
        config.macdrop_p0,
        config.macdrop_curriculum,
        f" alpha={config.macdrop_alpha:g}" if config.macdrop_curriculum == "exp" else "",
        config.macdrop_scope,
        config.macdrop_mask_per,
    )
    if uses_ray():
        # the driver trains nothing (the launcher holds the output dir): the keys travel with the
        # arguments to the Ray workers, whose _training_function (wrapped below) swaps the trainer
        # class in their own interpreter
        return original(args, callbacks)
    with claimed(parsed.output_dir), macdrop_trainers(config, stage):  # writable and ours, before loading
        return original(lf_args, callbacks)


def _wrap_training_function(original):
    """``tuner._training_function`` with the ``macdrop_*`` keys applied, for the run that reaches it
    with them: a Ray worker's (``run_exp`` removes them on every other path, so there this is a
    pass-through). Each worker validates them again, as every torchrun child does."""

    @functools.wraps(original)
    def _training_function(config: dict[str, Any]) -> None:
        args = config.get("args")
        if args is None or not split_macdrop_args(args)[1]:
            return original(config)
        lf_args, macdrop = validate_args(args)
        if macdrop is None:  # macdrop: false; the driver has already warned about the other keys
            return original({**config, "args": lf_args})
        from .arguments import run_args

        with macdrop_trainers(macdrop, run_args(lf_args).stage):
            return original({**config, "args": lf_args})

    setattr(_training_function, _PATCHED, True)
    return _training_function


def _wrap_export(original, read_args):
    @functools.wraps(original)
    def export_model(args: Optional[dict[str, Any]] = None) -> None:
        lf_args, _ = split_macdrop_args(read_args(args))  # macdrop_* keys may stay in an export YAML
        return original(lf_args)

    setattr(export_model, _PATCHED, True)
    return export_model


def patch_tuner(tuner) -> None:
    """Wrap ``run_exp`` and ``export_model`` of ``llamafactory.train.tuner``, and what LlamaBoard
    reads of a run (``LogCallback``: :mod:`.llamaboard`) (idempotent)."""
    from .. import llamaboard

    try:
        from llamafactory.train.callbacks import LogCallback
    except ImportError as err:  # a moved class costs LlamaBoard's macdrop_p only: say so, go on
        from ...integrations.transformers.trainer import logger

        logger.warning(
            f"LLaMA-Factory's LogCallback not found ({err}): macdrop_p will be missing from "
            "trainer_log.jsonl and LlamaBoard; it is still in trainer_state.json"
        )
    else:
        llamaboard.patch_log_callback(LogCallback)
    read_args = getattr(tuner, "read_args", None)
    for name, wrap in (("run_exp", _wrap_run_exp), ("export_model", _wrap_export)):
        fn = getattr(tuner, name, None)
        if fn is None or read_args is None or getattr(fn, _PATCHED, False):
            continue  # a missing function surfaces as LF's own 'keys are not used' error
        setattr(tuner, name, wrap(fn, read_args))
    # a Ray worker's entry point; a worker whose tuner is NOT patched (start-up hook switched off
    # there) is loud too: LLaMA-Factory's parser refuses the macdrop_* keys the driver hands on
    training_function = getattr(tuner, "_training_function", None)
    if training_function is not None and not getattr(training_function, _PATCHED, False):
        tuner._training_function = _wrap_training_function(training_function)


def patch_launcher(launcher) -> None:
    """Wrap ``launch``: early validation, and one-line errors instead of tracebacks.

    For ``train`` it also hands torchrun children (``FORCE_TORCHRUN=1``, several devices) a file
    in :data:`ERROR_FILE_ENV`: the first child that stops on a plugin error leaves its message
    there, the others end (see :func:`..child_errors.end_child_with`), and this process prints it as the same
    one line.
    """
    original = getattr(launcher, "launch", None)
    if original is None or getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def launch():
        error_file = None
        try:
            output_dir = None
            if len(sys.argv) > 1 and sys.argv[1] == "train":
                output_dir = validate_command_line(list(sys.argv))
                fd, error_file = tempfile.mkstemp(prefix="macdrop-error-", suffix=".txt")
                os.close(fd)
                os.environ[ERROR_FILE_ENV] = error_file
            try:
                with claimed(output_dir):  # held for the torchrun children too
                    return original()
            finally:
                message = child_errors.read_and_remove(error_file)
                if message:
                    print(f"[macdrop] error: {message}", file=sys.stderr, flush=True)
                    sys.exit(2)
        except plugin_errors() as err:
            # a Ray worker's error reaches the driver wrapped (ray.exceptions.RayTaskError, an
            # instance of the worker's exception class too); its cause holds the one line
            print(f"[macdrop] error: {getattr(err, 'cause', None) or err}", file=sys.stderr, flush=True)
            sys.exit(2)

    setattr(launch, _PATCHED, True)
    launcher.launch = launch


#: the v1 launcher's training commands (``USE_V1=1 llamafactory-cli sft x.yaml``)
V1_TRAIN_COMMANDS = ("train", "sft", "dpo", "rm")


def patch_v1_launcher(launcher) -> None:
    """Wrap the v1 launcher's ``launch`` (``USE_V1=1``): its trainers are LLaMA-Factory's own loop,
    which MacDrop cannot enter, so a MacDrop run is refused in one line before anything loads."""
    original = getattr(launcher, "launch", None)
    if original is None or getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def launch():
        if len(sys.argv) > 1 and sys.argv[1] in V1_TRAIN_COMMANDS:
            try:
                refuse_skipping_switches(list(sys.argv))
            except plugin_errors() as err:
                print(f"[macdrop] error: {err}", file=sys.stderr, flush=True)
                sys.exit(2)
        return original()

    setattr(launch, _PATCHED, True)
    launcher.launch = launch


def on_module_loaded(module) -> None:
    """Called by the start-up hook right after a watched LLaMA-Factory module executed."""
    if module.__name__ == "llamafactory.launcher":
        patch_launcher(module)
    elif module.__name__ == "llamafactory.v1.launcher":
        patch_v1_launcher(module)
    elif module.__name__ == "llamafactory.train.tuner":
        patch_tuner(module)
    elif module.__name__ == "llamafactory.extras.ploting":
        from ..llamaboard import patch_loss_plot

        patch_loss_plot(module)


def activate() -> None:
    """Apply the patches in this process (when the ``.pth`` hook is disabled or bypassed)."""
    for name in ("llamafactory.launcher", "llamafactory.train.tuner", "llamafactory.extras.ploting"):
        on_module_loaded(importlib.import_module(name))
