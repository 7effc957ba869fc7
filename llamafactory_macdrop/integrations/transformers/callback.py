"""MacDrop as a transformers ``TrainerCallback``, for hosts that take callbacks but not a Trainer
class (ms-swift's ``callbacks``, a script that builds its own Trainer, ``run_exp(args, callbacks)``).

What a callback can and cannot do. HF Trainer fires ``on_step_begin`` once per optimizer step,
before its micro-batches, and ``on_step_end`` after the optimizer step; nothing fires around one
micro-batch, and nothing at all when the loop raises (an error or Ctrl-C leaves ``train()``
without ``on_step_end`` or ``on_train_end``). Weights masked at ``on_step_begin`` and restored at
``on_step_end`` would stay masked after any exception, and a notebook that catches it and then
merges or saves the model would keep the dropped rows. So, at ``on_train_begin``, this callback
finds the Trainer that runs it and wraps that instance's ``training_step`` (one attribute,
removed at ``on_train_end``): the step's mask, drawn from ``mask_seed(seed, t, 0)`` when step t
begins, is in place for every forward and backward of step t (gradient-checkpoint recomputation
included) and the rows are written back when each micro-batch's ``training_step`` returns or
raises (``BaseException``: KeyboardInterrupt too). Outside ``training_step`` the rows are the
original ones, so an exception anywhere else leaves nothing masked.

Refused, in one line, because a callback cannot do them: ``macdrop_mask_per: micro_batch`` (the
callback draws one mask per optimizer step, at ``on_step_begin``) and a loop that is not a
transformers Trainer's. Use :func:`.trainer.with_macdrop` for per-micro-batch masks; it also
checks the gradient norm (the callback stops on non-finite step losses only) and warns when a
resume changes the settings. Everything else is :func:`.trainer.with_macdrop`'s: the same keys
and checks, the locator at the first step (the first token really seen), every storage backend,
DPO's reference forward on the original rows, ``macdrop_p`` in the log history (the callbacks
after this one see it too), ``macdrop_locator.json``, ``macdrop_settings.json`` in each
checkpoint, resuming.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from ...plugin.keys import MacDropConfig, MacDropConfigError
from .checks import check_trainer
from .trainer import (
    MacDropRun,
    MacDropTrainerMixin,
    NonFiniteTrainingError,
    _check_trainer_class,
    _distributed,
    build_run,
    check_epoch_count,
    last_checkpoint,
    logger,
    macdrop_config_from,
    progress_of,
    write_settings,
)

_GUARD = "__macdrop_callback_guard__"


def _running_trainer(callback: TrainerCallback) -> Optional[Any]:
    """The transformers Trainer whose callback handler is calling ``callback`` right now (found on
    the call stack: callbacks are not handed their trainer)."""
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and callback in getattr(owner.callback_handler, "callbacks", ()):
            return owner
        frame = frame.f_back
    return None


class MacDropCallback(TrainerCallback):
    """``MacDropCallback(**macdrop_keys)``: MacDrop through a Trainer's callbacks (module docstring).

    ``macdrop_keys`` are the ``macdrop_*`` keys with their names, values and one-line errors
    (``macdrop`` defaults to true), or pass a built :class:`MacDropConfig` as ``config``.
    """

    def __init__(self, config: Optional[MacDropConfig] = None, **macdrop_keys: Any) -> None:
        self.config = macdrop_config_from(config, macdrop_keys, "MacDropCallback")
        if self.config.macdrop and self.config.macdrop_mask_per != "optimizer_step":
            raise MacDropConfigError(
                f"MacDropCallback with macdrop_mask_per={self.config.macdrop_mask_per!r} is not supported: a callback "
                "draws one mask per optimizer step (on_step_begin); a mask per micro-batch needs the trainer's own "
                "training_step: use with_macdrop(YourTrainer, macdrop_mask_per='micro_batch')"
            )
        self.run: Optional[MacDropRun] = None
        self._trainer: Any = None
        self._progress = None
        self._loss_bad: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ set-up
    def on_train_begin(self, args, state, control, **kwargs):
        if not self.config.macdrop:
            logger.warning("MacDropCallback(macdrop=False): MacDrop is off for this run")
            return
        trainer = _running_trainer(self)
        if trainer is None:
            raise MacDropConfigError(
                "MacDropCallback is not supported here: it runs inside a transformers Trainer's train() "
                "(its training_step carries the masks); this loop only calls the callback"
            )
        cls = type(trainer)
        if issubclass(cls, MacDropTrainerMixin):
            raise MacDropConfigError(
                f"MacDropCallback on {cls.__name__}, which already runs MacDrop (with_macdrop): use one of the two"
            )
        _check_trainer_class(cls)
        check_trainer(trainer, self.config)
        check_epoch_count(self.config, state)
        self._trainer = trainer
        self._guard(trainer)

    def _guard(self, trainer: Any) -> None:
        """Wrap this trainer instance's ``training_step``: the step's mask in place during it, the
        original rows back when it returns or raises."""
        current = trainer.__dict__.get("training_step")
        if current is not None and getattr(current, _GUARD, None) is self:
            return
        original = trainer.training_step  # bound: the class's method, whatever the subclass

        def training_step(model, inputs, *args, **kwargs):
            if self.run is None:
                self.run = build_run(trainer, self.config, inputs)
            progress = self._progress or progress_of(trainer.state)
            with self.run.step(progress, 0):
                loss = original(model, inputs, *args, **kwargs)
            if isinstance(loss, torch.Tensor):  # remembered on the device: no sync per micro-batch
                bad = ~torch.isfinite(loss.detach()).all()
                self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
            return loss

        setattr(training_step, _GUARD, self)
        trainer.training_step = training_step

    # ------------------------------------------------------------------ per optimizer step
    def on_step_begin(self, args, state, control, **kwargs):
        self._progress = progress_of(state)  # the step's mask: mask_seed(seed, t, 0), for all its micro-batches

    def on_step_end(self, args, state, control, **kwargs):
        """Stop a step whose loss was non-finite before the Trainer logs or saves it."""
        self._progress = None
        bad, self._loss_bad = self._loss_bad, None
        if self.run is None:
            return
        flag = torch.zeros((), device=args.device) if bad is None else bad.float().to(args.device)
        if _distributed():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return
        step = int(state.global_step)
        ckpt = last_checkpoint(args.output_dir, step)
        saved = (
            f"the last checkpoint, {ckpt[0]}, was saved at step {ckpt[1]}, before the first non-finite step"
            if ckpt
            else f"{args.output_dir} holds no checkpoint from before this step"
        )
        p = self.run.last_p
        raise NonFiniteTrainingError(
            f"MacDrop run went non-finite at optimizer step {step} (the training loss is nan/inf, macdrop_p="
            f"{p if p is None else round(p, 6)}): stopped before anything of step {step} was logged or saved; {saved}"
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        """``macdrop_p`` beside the loss: in the Trainer's log history and for the callbacks after this one."""
        p = self.run.last_p if self.run is not None else None
        if p is None or not logs or "loss" not in logs:
            return
        logs["macdrop_p"] = p
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last["macdrop_p"] = p

    def on_save(self, args, state, control, **kwargs):
        if self.run is not None and self._trainer is not None:
            write_settings(self._trainer, self.config)

    def on_train_end(self, args, state, control, **kwargs):
        trainer, self._trainer = self._trainer, None
        if trainer is not None and getattr(trainer.__dict__.get("training_step"), _GUARD, None) is self:
            del trainer.training_step
