"""MacDrop inside any transformers ``Trainer``: a mixin keyed on ``training_step``, and
:func:`with_macdrop`, which puts it in front of a Trainer class (``Trainer``, ``Seq2SeqTrainer``,
TRL's ``SFTTrainer`` and ``DPOTrainer``, LLaMA-Factory's trainers, a user's own subclass).

Why ``training_step``: it is the one method HF Trainer calls once per micro-batch that contains
both forward and backward (and therefore gradient-checkpoint recomputation). Algorithm 1 needs the
masked rows in place for exactly that span and restored right after; callbacks only fire per
optimizer step (:mod:`.callback` is the form for hosts that take nothing else). Nothing here knows
a host: the LLaMA-Factory seam (``plugin/lf/patches.py``) and the axolotl plugin
(``integrations/axolotl/``) call :func:`with_macdrop` like any user.

Counting: p is computed from the 1-based optimizer step t = ``state.global_step + 1`` and the
1-based epoch ``int(state.epoch) + 1``. Masks come from a private generator re-seeded at every
micro-batch, so the global RNG stream (data order, LoRA dropout) is the same as without MacDrop,
and a resumed run draws the masks an uninterrupted run would have drawn. The seed never depends
on the rank.

``macdrop_mask_per: optimizer_step`` (default): the seed is ``mask_seed(seed, t, 0)`` for every
micro-batch of step t, on every rank, so the whole global batch of one optimizer step sees ONE
keep-mask, whatever its split into ranks x micro-batches x accumulation steps (batch 2 x GA 1,
batch 1 x GA 2 and 2 ranks x batch 1 train with identical masks). That is Algorithm 1 on the
global batch; under ZeRO-3 and FSDP it is also what makes the gathered weight consistent (each
rank masks only the elements its own partition or shard holds). ``micro_batch``: the seed is
``mask_seed(seed, t, micro)``, a fresh mask per micro-batch (ranks still agree), so the number
of masks per step depends on the gradient-accumulation setting.

Divergence: after every optimizer step the global gradient norm the Trainer computed (identical
on all ranks) is checked before anything of that step is saved; a non-finite step stops the run
with one line (:class:`NonFiniteTrainingError`) instead of training on NaN weights, which HF's
``logging_nan_inf_filter`` would log as ``loss 0.0``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from ...core.architectures import FFNBlock, find_ffn_blocks
from ...core.atomic_write import write_text_atomic
from ...core.curriculum import Progress, build_curriculum, epoch_curriculum_problem
from ...core.first_token import batch_first_token
from ...core.locator import (
    LOCATOR_FILE,
    LocatorError,
    LocatorResult,
    locate_massive_weights,
    reuse_result,
)
from ...core.masking import RowDropout
from ...core.storage import readable_weights
from ...errors import MacDropError
from ...plugin.keys import MacDropConfig, MacDropConfigError

logger = logging.getLogger("llamafactory_macdrop")
if not any(getattr(h, "_macdrop_console", False) for h in logger.handlers):  # LlamaBoard may have added its own
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[%(levelname)s|macdrop] %(message)s"))
    _handler._macdrop_console = True
    logger.addHandler(_handler)
logger.setLevel(logging.INFO)
logger.propagate = False

#: written into every checkpoint this plugin's trainer saves: the settings that produced it
SETTINGS_FILE = "macdrop_settings.json"
#: what decides p and the masks after a resume (k, layer and indices are checked against the locator file)
RESUME_KEYS = ("macdrop_p0", "macdrop_curriculum", "macdrop_alpha", "macdrop_scope", "macdrop_mask_per")
#: what else a resume warns about: the masks are drawn from the seed; the rows are reused from the
#: locator file, so a changed probe token is not used
RESUME_NOTES = {
    "seed": "the masks are drawn from it: they differ from the interrupted run's from here on",
    "macdrop_probe_token": "not used: the rows are reused from macdrop_locator.json",
}

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant for seed mixing
_MASK64 = (1 << 63) - 1


def scope_rows(scope: str, indices: Sequence[int], intermediate_size: int) -> torch.Tensor:
    """Intermediate units whose W_up/W_gate rows get dropout, for ``macdrop_scope``."""
    if scope == "massive":
        return torch.tensor(list(indices), dtype=torch.long)
    if scope == "all":
        return torch.arange(intermediate_size)
    if scope == "non_massive":
        keep = torch.ones(intermediate_size, dtype=torch.bool)
        keep[torch.tensor(list(indices), dtype=torch.long)] = False
        if not keep.any():
            raise MacDropConfigError(
                f"macdrop_scope='non_massive' leaves no row to drop: the layer is {intermediate_size} wide and all "
                f"{len(indices)} massive rows are kept; use fewer rows (macdrop_k), or another scope"
            )
        return keep.nonzero().flatten()
    raise ValueError(f"unknown scope {scope!r}")


class NonFiniteTrainingError(MacDropError, RuntimeError):
    """A MacDrop run produced a non-finite gradient norm or loss; the message is one line."""


def mask_seed(seed: int, step: int, micro: int) -> int:
    """A 63-bit seed for one micro-batch's mask; distinct per (seed, step, micro), rank-free."""
    h = seed & _MASK64
    for part in (step, micro):
        h = ((h ^ (part & _MASK64)) * _MIX + 0x632BE59BD9B4E019) & _MASK64
    return h


class MacDropRun:
    """One training run's MacDrop state: where to drop, how much, and the dropout mechanism."""

    def __init__(
        self,
        config: MacDropConfig,
        result: LocatorResult,
        blocks: Sequence[FFNBlock],
        seed: int = 0,
        model: Optional[torch.nn.Module] = None,
    ) -> None:
        """``model``: the model as the trainer runs it, needed when FSDP shards it (the targets
        then edit FSDP's per-rank storage, found from the model's FSDP modules)."""
        self.config = config
        self.result = result
        self.curriculum = build_curriculum(config.macdrop_curriculum, config.macdrop_p0, config.macdrop_alpha)
        block = {b.index: b for b in blocks}[result.layer]
        rows = scope_rows(config.macdrop_scope, result.indices, block.intermediate_size)
        with readable_weights(model) if model is not None else nullcontext():
            targets = block.row_targets(rows, expert=result.expert, model=model)
            self.dropout = RowDropout(targets)
        self.generator = torch.Generator(device=self.dropout.device)
        self.seed = seed
        self.last_p: Optional[float] = None
        self._last_keep: Optional[torch.Tensor] = None  # the last mask (read only when logged: no sync per step)

    def probability(self, progress: Progress) -> float:
        return self.curriculum.probability(progress)

    @contextmanager
    def step(self, progress: Progress, micro: int = 0) -> Iterator[Optional[torch.Tensor]]:
        """Mask for one micro-batch of optimizer step ``progress.step``; restore on exit.

        ``micro`` enters the seed only with ``macdrop_mask_per: micro_batch``; by default every
        micro-batch of the step re-draws the same mask from ``mask_seed(seed, step, 0)``.
        """
        p = self.probability(progress)
        self.last_p = p
        if p > 0:
            part = micro if self.config.macdrop_mask_per == "micro_batch" else 0
            self.generator.manual_seed(mask_seed(self.seed, progress.step, part))
        with self.dropout.masked(p, self.generator) as keep:
            self._last_keep = keep
            yield keep

    @property
    def dropped_fraction(self) -> Optional[float]:
        """The share of the target rows' elements the last mask dropped (0 at p = 0; None before a step)."""
        if self.last_p is None:
            return None
        keep = self._last_keep
        return 0.0 if keep is None else float(1.0 - keep.float().mean())


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _broadcast_from_rank0(payload: Any) -> Any:
    """Rank 0's ``payload`` on every rank (itself without a process group)."""
    if not _distributed():
        return payload
    box = [payload]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def last_checkpoint(output_dir: str, before: int) -> Optional[tuple[str, int]]:
    """The newest ``output_dir/checkpoint-N`` with N < ``before`` and its N (None if there is none)."""
    try:
        names = os.listdir(output_dir)
    except OSError:
        return None
    steps = [int(m.group(1)) for m in map(re.compile(r"checkpoint-(\d+)$").match, names) if m]
    steps = [n for n in steps if n < before and os.path.isdir(os.path.join(output_dir, f"checkpoint-{n}"))]
    return (os.path.join(output_dir, f"checkpoint-{max(steps)}"), max(steps)) if steps else None


def _rank0_first_token(inputs: Any, tokenizer: Any):
    """The first training batch's position-0 token as rank 0 sees it, on every rank (all ranks
    must probe the same candidates: a sharded model runs each probe on all ranks together)."""
    rank0 = not _distributed() or torch.distributed.get_rank() == 0
    first = batch_first_token(inputs, tokenizer) if rank0 and isinstance(inputs, Mapping) else None
    return _broadcast_from_rank0(first)


def _broadcast_result(result: LocatorResult) -> LocatorResult:
    """Make every rank use rank 0's locator result (same layer and indices everywhere)."""
    return LocatorResult.from_dict(_broadcast_from_rank0(result.to_dict())) if _distributed() else result


def progress_of(state: Any) -> Progress:
    """Where a Trainer's run stands as an optimizer step begins (1-based step and epoch)."""
    total = max(int(state.max_steps), 1)
    epochs = max(int(getattr(state, "num_train_epochs", 1) or 1), 1)
    step = min(int(state.global_step) + 1, total)
    epoch = min(int(state.epoch or 0) + 1, epochs)
    return Progress(step=step, total_steps=total, epoch=epoch, num_epochs=epochs)


def check_epoch_count(config: MacDropConfig, state: Any) -> None:
    """Refuse an epoch curriculum the run's epoch count makes degenerate (before any step)."""
    name = config.macdrop_curriculum
    problem = epoch_curriculum_problem(name, int(getattr(state, "num_train_epochs", 0) or 0))
    if problem is not None:
        raise MacDropConfigError(
            f"macdrop_curriculum={name!r} cannot mean what the paper means here: {problem}; "
            "use macdrop_curriculum: step, exp or constant, or train several epochs"
        )


def guard_reference_forwards(model: torch.nn.Module, dropout: RowDropout) -> int:
    """While a peft model does not run the adapter being trained, show the ORIGINAL rows; returns the
    models guarded.

    A forward with the trained adapter switched off is a reference forward: DPO's reference
    log-probs come from the same model with its adapter disabled (LLaMA-Factory's
    ``compute_reference_log_probs``, TRL 0.2x's ``null_ref_context``, TRL 1.x's
    ``use_adapter(model, None)``: all enter ``PeftModel.disable_adapter()``) or, where TRL 1.x was
    given a model that already carries an adapter, with a frozen copy of it made active
    (``use_adapter(model, "ref")``: ``PeftModel.set_adapter("ref")``). It runs inside the training
    step, while the rows are masked; the guard restores them for it and re-applies the very same
    mask after (``RowDropout.unmasked``), whatever the trainer class, so no host is recognised by name.
    """
    guarded = 0
    for module in model.modules():
        if (
            hasattr(type(module), "disable_adapter")
            and hasattr(type(module), "set_adapter")
            and hasattr(module, "peft_config")
        ):
            _guard_peft_model(module, dropout)
            guarded += 1
    return guarded


def _guard_peft_model(peft_model: torch.nn.Module, dropout: RowDropout) -> None:
    disable, switch = (
        type(peft_model).disable_adapter.__get__(peft_model),
        type(peft_model).set_adapter.__get__(peft_model),
    )
    trained = set(_adapter_names(peft_model.active_adapters))
    away: list[ExitStack] = []  # the unmasked state entered by switching to another adapter

    @contextmanager
    def disable_adapter(*args: Any, **kwargs: Any):
        with dropout.unmasked(), disable(*args, **kwargs) as value:
            yield value

    def set_adapter(adapter_name: Any, *args: Any, **kwargs: Any):
        result = switch(adapter_name, *args, **kwargs)
        other = set(_adapter_names(adapter_name)) != trained
        if other and not away:
            stack = ExitStack()
            stack.enter_context(dropout.unmasked())
            away.append(stack)
        elif not other and away:
            away.pop().close()
        return result

    peft_model.disable_adapter = disable_adapter
    peft_model.set_adapter = set_adapter


def _adapter_names(names: Any) -> list[str]:
    return [names] if isinstance(names, str) else list(names or [])


def build_run(trainer: Any, config: MacDropConfig, first_inputs: Any = None) -> MacDropRun:
    """Locate (or, on resume, reuse ``output_dir/macdrop_locator.json``) and build the dropout of
    ``trainer``'s run, at its first training step.

    At the first step, because under ZeRO-3 forward passes only work once the engine exists, and
    because the model must already carry its adapters (the targets are their base layers).
    ``first_inputs``: the first micro-batch, whose position-0 token is the first probe candidate.
    """
    model = trainer.model
    blocks = find_ffn_blocks(model)
    path = os.path.join(trainer.args.output_dir, LOCATOR_FILE)
    rank0 = trainer.is_world_process_zero()
    reused = _reused_result(trainer, config, path, blocks)
    if reused is not None:
        # resumed from a checkpoint: drop exactly the rows the interrupted run dropped
        result = reused
        if rank0:
            logger.info("%s\n  reused from %s (resuming at step %d)", result.table(), path, trainer.state.global_step)
    else:
        # Every rank runs the probe (a sharded model needs all ranks in the forward pass);
        # rank 0's answer is then used everywhere.
        tokenizer = getattr(trainer, "processing_class", None)
        first = _rank0_first_token(first_inputs, tokenizer) if config.macdrop_probe_token is None else None
        result = locate_massive_weights(
            model,
            config.macdrop_k,
            tokenizer=tokenizer,
            first_token=first,
            probe_token=config.macdrop_probe_token,
            layer=config.macdrop_layer,
            indices=config.macdrop_indices,
            blocks=blocks,
        )
        result = _broadcast_result(result)
        if rank0:
            result.write_json(path)
            logger.info("%s\n  written to %s", result.table(), path)
            for w in result.warnings:
                logger.warning(w)
    run = MacDropRun(config, result, blocks, seed=trainer.args.seed, model=model)
    if run.dropout.trainable and getattr(trainer, "is_deepspeed_enabled", False):
        from ...plugin.checks import trainable_rows_refusal

        raise MacDropConfigError(trainable_rows_refusal(run.dropout.trainable_names(), "DeepSpeed"))
    guard_reference_forwards(model, run.dropout)
    if rank0:
        logger.info("MacDrop storage: %s", "; ".join(t.describe() for t in run.dropout.targets))
    return run


def _reused_result(
    trainer: Any, config: MacDropConfig, path: str, blocks: Sequence[FFNBlock]
) -> Optional[LocatorResult]:
    """On resume, the interrupted run's locator result from ``path`` (None: locate afresh).

    Only rank 0 writes the file, so only rank 0 decides and reads it; the decision, the result
    or the error reach every rank by one broadcast. Ranks without the file (multi-node without
    a shared filesystem) thus neither locate alone, while rank 0 waits, nor raise alone.
    """
    payload: tuple[Optional[dict], Optional[str]] = (None, None)
    if trainer.is_world_process_zero() and trainer.state.global_step > 0 and os.path.isfile(path):
        cfg = config
        try:
            found = reuse_result(path, trainer.model, blocks, cfg.macdrop_k, cfg.macdrop_layer, cfg.macdrop_indices)
            payload = (found.to_dict(), None)
        except LocatorError as err:
            payload = (None, str(err))
        except (OSError, ValueError, KeyError, TypeError) as err:
            payload = (None, f"{path} cannot be read ({type(err).__name__}: {err}): delete it to locate again")
    data, error = _broadcast_from_rank0(payload)
    if error is not None:
        raise LocatorError(error)
    return LocatorResult.from_dict(data) if data is not None else None


def write_settings(trainer: Any, config: MacDropConfig) -> None:
    """Record in ``output_dir/checkpoint-<step>`` the MacDrop settings that produced it (rank 0)."""
    folder = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    if trainer.is_world_process_zero() and os.path.isdir(folder):
        progress = progress_of(trainer.state)
        saved = {
            **config.to_dict(),
            "total_steps": progress.total_steps,
            "num_epochs": progress.num_epochs,
            "seed": trainer.args.seed,
        }
        write_text_atomic(os.path.join(folder, SETTINGS_FILE), json.dumps(saved, indent=1))


def tracked_settings(result: LocatorResult) -> dict[str, Any]:
    """What a run's trackers record once, at the first step: where MacDrop drops."""
    return {
        "macdrop_layer": result.layer,
        "macdrop_rows": list(result.indices),
        "macdrop_expert": result.expert,
        "macdrop_probe_token_id": result.probe_token_id,
        "macdrop_probe_token": result.probe_token_text,
        "macdrop_locator_source": result.source,
    }


def record_in_trackers(trainer: Any, result: LocatorResult) -> None:
    """The located layer, rows and probe token in the run's config of the trackers the Trainer
    reports to: W&B's run config, TensorBoard's text panel (``macdrop/located``, and its hparams
    table). Called once, on rank 0; a tracker that is not set up is left alone."""
    info = tracked_settings(result)
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        name = type(callback).__name__
        if name == "WandbCallback":
            wandb = getattr(callback, "_wandb", None)
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.config.update(info, allow_val_change=True)
        elif name == "TensorBoardCallback":
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.add_text("macdrop/located", json.dumps(info))
                writer.flush()


class MacDropTrainerMixin:
    """Mix in FRONT of a transformers Trainer class; set ``macdrop_config`` on the class."""

    macdrop_config: MacDropConfig
    _macdrop_run: Optional[MacDropRun] = None
    _macdrop_micro: tuple[int, int] = (0, -1)  # (optimizer step, micro-batch index)
    _macdrop_checked_step: int = -1  # last optimizer step checked for non-finite values
    _macdrop_loss_bad: Optional[torch.Tensor] = None  # any non-finite micro-batch loss since that check
    _macdrop_first_inputs: Any = None  # the first micro-batch, for the probe's first candidate

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # what the Trainer's arguments and the model's config already refuse, before any step
        from .checks import check_trainer

        check_trainer(self, self.macdrop_config)

    # ------------------------------------------------------------------ set-up
    def macdrop_setup(self) -> MacDropRun:
        """Locate (once per run) and build the dropout; called lazily at the first step
        (:func:`build_run`). ``self._macdrop_first_inputs``: the first micro-batch (set by
        ``training_step``), whose position-0 token is the first probe candidate."""
        first_inputs, self._macdrop_first_inputs = self._macdrop_first_inputs, None  # not kept for the run
        self._macdrop_run = build_run(self, self.macdrop_config, first_inputs)
        return self._macdrop_run

    def macdrop_check_curriculum(self) -> None:
        """Refuse an epoch curriculum the run's epoch count makes degenerate (before any step)."""
        check_epoch_count(self.macdrop_config, self.state)

    def _macdrop_start(self) -> MacDropRun:
        self.macdrop_check_curriculum()
        run = self.macdrop_setup()
        if self.is_world_process_zero():
            record_in_trackers(self, run.result)
        self._macdrop_checked_step = int(self.state.global_step)
        if self.state.global_step > 0 and self.is_world_process_zero():
            self._macdrop_warn_changed_settings()
        return run

    # ------------------------------------------------------------------ resuming with other settings
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._macdrop_resumed_from = resume_from_checkpoint  # which checkpoint's settings to compare with
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        super()._save_checkpoint(model, trial, *args, **kwargs)
        write_settings(self, self.macdrop_config)

    def _macdrop_warn_changed_settings(self) -> None:
        """A resumed run whose p differs from what the checkpoint's run would have used (other p0,
        curriculum, alpha, or, where the curriculum counts them, other total steps or epochs), or
        whose scope or mask_per differ, or whose seed (the masks) or probe token (unused on resume)
        differ: one warning naming old and new. The checkpoint's settings
        are in its ``macdrop_settings.json`` (checkpoints saved before it existed are not checked)."""
        checkpoint = getattr(self, "_macdrop_resumed_from", None)
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        path = os.path.join(str(checkpoint), SETTINGS_FILE) if checkpoint else None
        if path is None or not os.path.isfile(path):
            return
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            now = self.macdrop_config.to_dict()
            progress = self.macdrop_progress()
            then = dataclasses.replace(
                progress,
                total_steps=int(saved.get("total_steps", progress.total_steps)),
                num_epochs=int(saved.get("num_epochs", progress.num_epochs)),
            )
            old = {k: saved.get(k, now[k]) for k in RESUME_KEYS}
            p_old = build_curriculum(
                old["macdrop_curriculum"], float(old["macdrop_p0"]), float(old["macdrop_alpha"])
            ).probability(then)
        except (OSError, ValueError, TypeError, AttributeError) as err:
            logger.warning("%s cannot be read (%s): the resumed run's MacDrop settings are not compared", path, err)
            return
        p_new = self._macdrop_run.probability(progress)
        same_p = math.isclose(p_old, p_new, rel_tol=1e-9, abs_tol=1e-12)
        changed = [f"{k} {old[k]!r} -> {now[k]!r}" for k in RESUME_KEYS if old[k] != now[k]]
        now_notes = {"seed": self.args.seed, "macdrop_probe_token": now["macdrop_probe_token"]}
        changed += [
            f"{k} {saved[k]!r} -> {now_notes[k]!r} ({why})"
            for k, why in RESUME_NOTES.items()
            if k in saved and saved[k] != now_notes[k]
        ]
        if not same_p:
            changed += [
                f"{what} {a} -> {b}"
                for what, a, b in (
                    ("optimizer steps", then.total_steps, progress.total_steps),
                    ("epochs", then.num_epochs, progress.num_epochs),
                )
                if a != b
            ]
        if not changed:
            return
        p_text = (
            f"p at step {progress.step} stays {p_new:.4g}"
            if same_p
            else f"p at step {progress.step} is {p_new:.4g} (the checkpoint's settings give {p_old:.4g})"
        )
        logger.warning(
            "resuming %s with other MacDrop settings than it was trained with: %s; %s",
            checkpoint,
            ", ".join(changed),
            p_text,
        )

    def macdrop_progress(self) -> Progress:
        return progress_of(self.state)

    # ------------------------------------------------------------------ trainer hooks
    def training_step(self, model, inputs, *args, **kwargs):
        if self._macdrop_run is None:
            self._macdrop_first_inputs = inputs
        run = self._macdrop_run or self._macdrop_start()
        progress = self.macdrop_progress()
        last_step, last_micro = self._macdrop_micro
        micro = last_micro + 1 if last_step == progress.step else 0
        self._macdrop_micro = (progress.step, micro)
        with run.step(progress, micro):
            loss = super().training_step(model, inputs, *args, **kwargs)
        if isinstance(loss, torch.Tensor):  # remembered on the device: no sync per micro-batch
            bad = ~torch.isfinite(loss.detach()).all()
            self._macdrop_loss_bad = bad if self._macdrop_loss_bad is None else self._macdrop_loss_bad | bad
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        # transformers calls this right after every optimizer step (and again at each epoch end),
        # BEFORE it logs, evaluates or saves that step: the one place to stop a non-finite step
        # from reaching a checkpoint. Its grad_norm is the global norm (all ranks agree); under
        # DeepSpeed it is the engine's, from the step that ran inside training_step.
        self.macdrop_check_finite(grad_norm)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def macdrop_check_finite(self, grad_norm: Any) -> None:
        """Raise :class:`NonFiniteTrainingError` if the optimizer step just taken was non-finite.

        One scalar read per optimizer step. The global grad norm decides (the same on every rank,
        so every rank raises together and none waits in a collective). fp16 loss-scaler skip steps
        (inf gradients of the SCALED loss; the scaler lowers the scale and the step is not applied)
        are exempt unless the loss itself was non-finite; without a grad norm (DeepSpeed with
        ``compute_grad_norm: false``) the raw step losses decide, agreed by one all_reduce.
        """
        run, step = self._macdrop_run, int(self.state.global_step)
        if run is None or step <= self._macdrop_checked_step:
            return
        self._macdrop_checked_step = step
        bad_loss, self._macdrop_loss_bad = self._macdrop_loss_bad, None
        scaler_skip = bool(getattr(self.args, "fp16", False)) and bool(self.accelerator.optimizer_step_was_skipped)
        if grad_norm is not None and not scaler_skip:
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor (every rank calls this together)
                grad_norm = grad_norm.full_tensor()
            value = float(grad_norm)
            if math.isfinite(value):
                return
            what = f"grad_norm={value}"
        else:
            flag = (
                torch.zeros((), device=self.args.device) if bad_loss is None else bad_loss.float().to(self.args.device)
            )
            if _distributed():
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if not flag.item():
                return
            what = "the training loss is nan/inf"
        # read off the checkpoint's name, its contents are not checked: every optimizer step is checked
        # as it ends, so a checkpoint-N with N < step predates the first non-finite step
        ckpt = last_checkpoint(self.args.output_dir, step)
        saved = (
            f"the last checkpoint, {ckpt[0]}, was saved at step {ckpt[1]}, before the first non-finite step"
            if ckpt
            else f"{self.args.output_dir} holds no checkpoint from before this step"
        )
        p = run.last_p
        raise NonFiniteTrainingError(
            f"MacDrop run went non-finite at optimizer step {step} ({what}, macdrop_p={p if p is None else round(p, 6)}): "
            f"stopped before anything of step {step} was logged or saved; {saved}"
        )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._macdrop_run is not None and self._macdrop_run.last_p is not None:
            logs["macdrop_p"] = self._macdrop_run.last_p
            logs["macdrop_dropped"] = round(self._macdrop_run.dropped_fraction, 6)
        return super().log(logs, *args, **kwargs)


#: TRL trainers outside Algorithm 1 (what LLaMA-Factory refuses as stages rm / ppo / kto, and the
#: online methods whose rollouts would be generated by the masked model)
UNSUPPORTED_TRAINERS = {
    "KTOTrainer": "MacDrop is not implemented for KTO's trainer",
    "PPOTrainer": "PPO's rollouts and value model are outside Algorithm 1",
    "RewardTrainer": "the reward model's value head training is not what MacDrop was defined for",
    "GRPOTrainer": "its rollouts would be generated by the masked model: online RL is outside Algorithm 1",
    "RLOOTrainer": "its rollouts would be generated by the masked model: online RL is outside Algorithm 1",
    "OnlineDPOTrainer": "its rollouts would be generated by the masked model: online RL is outside Algorithm 1",
}


def _check_trainer_class(trainer_cls: Any) -> None:
    from transformers import Trainer

    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise MacDropConfigError(
            f"with_macdrop({getattr(trainer_cls, '__name__', trainer_cls)!r}) is not supported: it needs a "
            "transformers Trainer class (Trainer, Seq2SeqTrainer, TRL's SFTTrainer / DPOTrainer, or a subclass)"
        )
    if issubclass(trainer_cls, MacDropTrainerMixin):
        raise MacDropConfigError(
            f"with_macdrop({trainer_cls.__name__}): that class already runs MacDrop (its keys: "
            f"{trainer_cls.macdrop_config.to_dict()}); pass the class it was built from"
        )
    for klass in trainer_cls.__mro__:
        if klass.__name__ in UNSUPPORTED_TRAINERS:
            raise MacDropConfigError(
                f"with_macdrop({trainer_cls.__name__}) is not supported ({UNSUPPORTED_TRAINERS[klass.__name__]}); "
                "supported: Trainer, Seq2SeqTrainer, TRL's SFTTrainer and DPOTrainer, and their subclasses"
            )


def macdrop_config_from(config: Optional[MacDropConfig], keys: Mapping[str, Any], caller: str) -> MacDropConfig:
    """One typed config from either a :class:`MacDropConfig` or ``macdrop_*`` keyword values
    (the same names and checks as a LLaMA-Factory YAML; ``macdrop`` defaults to true here)."""
    if config is not None:
        if keys:
            raise MacDropConfigError(f"{caller}: give either config= or macdrop_* keys, not both ({', '.join(keys)})")
        if not isinstance(config, MacDropConfig):
            raise MacDropConfigError(f"{caller}: config={config!r} is not a MacDropConfig")
        return config
    return MacDropConfig.from_raw({"macdrop": True, **keys})


def with_macdrop(trainer_cls: type, config: Optional[MacDropConfig] = None, **macdrop_keys: Any) -> type:
    """``trainer_cls`` with MacDrop in front: the same run the LLaMA-Factory plugin makes.

    ``macdrop_keys`` are the ``macdrop_*`` keys of ``macdrop keys`` / docs/configuration.md with
    the same names, values and one-line errors (``macdrop`` itself defaults to true); or pass a
    built :class:`MacDropConfig` as ``config``. Checked here: the keys, and that the class is a
    Trainer MacDrop supports. Checked when the trainer is created (:mod:`.checks`): what its
    arguments and the model's config already refuse. Then, per run: the locator at the first
    training step (the first token the model really sees), Algorithm 1 per optimizer step on
    every storage backend, the non-finite guard, ``macdrop_p`` in the logs,
    ``output_dir/macdrop_locator.json`` and resuming from it.

    ``macdrop=False`` returns ``trainer_cls`` itself, with a warning naming the keys it ignores.
    """
    _check_trainer_class(trainer_cls)
    if config is None and not MacDropConfig.switched_on({"macdrop": True, **macdrop_keys}):
        ignored = [k for k in macdrop_keys if k != "macdrop"]
        logger.warning(
            "with_macdrop(%s, macdrop=False): MacDrop is off, the class is returned unchanged%s",
            trainer_cls.__name__,
            f"; these keys are ignored (not checked): {', '.join(ignored)}" if ignored else "",
        )
        return trainer_cls
    config = macdrop_config_from(config, macdrop_keys, "with_macdrop")
    if not config.macdrop:
        logger.warning(
            "with_macdrop(%s, config with macdrop=False): the class is returned unchanged", trainer_cls.__name__
        )
        return trainer_cls
    return type(
        f"MacDrop{trainer_cls.__name__}",
        (MacDropTrainerMixin, trainer_cls),
        {"macdrop_config": config, "__module__": __name__, "__doc__": trainer_cls.__doc__},
    )


def attach_macdrop(trainer: Any, config: MacDropConfig) -> Any:
    """Give a Trainer that is already built MacDrop: its class becomes ``with_macdrop(its class)``.

    For hosts that build the trainer themselves and then hand it to plugins (axolotl's
    ``post_trainer_create``): whatever class they chose is kept and extended. The checks
    ``with_macdrop``'s trainers run when created (:func:`.checks.check_trainer`) run here.
    """
    from .checks import check_trainer

    extended = with_macdrop(type(trainer), config=config)
    if extended is not type(trainer):
        check_trainer(trainer, config)
        trainer.__class__ = extended
    return trainer
