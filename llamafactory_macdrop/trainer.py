"""MacDrop inside a transformers ``Trainer``: a mixin keyed on ``training_step``.

Why ``training_step``: it is the one method HF Trainer calls once per micro-batch that contains
both forward and backward (and therefore gradient-checkpoint recomputation). Algorithm 1 needs the
masked rows in place for exactly that span and restored right after; callbacks only fire per
optimizer step. Nothing here knows LLaMA-Factory: :mod:`.integration` mixes this into its
trainer classes.

Counting: p is computed from the 1-based optimizer step t = ``state.global_step + 1`` and the
1-based epoch ``int(state.epoch) + 1``; every micro-batch of a gradient-accumulation cycle gets a
FRESH mask with the same p. Masks come from a private generator re-seeded from (seed, t,
micro-batch), so the global RNG stream (data order, LoRA dropout) is the same as without
MacDrop, and a resumed run draws the masks an uninterrupted run would have drawn.

Across data-parallel ranks (DDP, DeepSpeed ZeRO-2/3, any number of nodes) the seed does not
depend on the rank: every rank applies the SAME mask to its slice of the global batch, which is
Algorithm 1 on the global batch exactly (one mask per step for the whole batch). Under ZeRO-3
and FSDP this is also what makes the gathered weight consistent: each rank masks only the
elements its own partition (shard) holds.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from .architectures import FFNBlock, find_ffn_blocks
from .config import MacDropConfig
from .curriculum import Progress, build_curriculum
from .first_token import batch_first_token
from .locator import LOCATOR_FILE, LocatorResult, locate_massive_weights, reuse_result
from .masking import RowDropout, bind_fsdp_shards, readable_weights

logger = logging.getLogger("llamafactory_macdrop")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[%(levelname)s|macdrop] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

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
        return keep.nonzero().flatten()
    raise ValueError(f"unknown scope {scope!r}")


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
            targets = block.row_targets(rows, expert=result.expert)
            if model is not None:
                bind_fsdp_shards(model, targets)
            self.dropout = RowDropout(targets)
        self.generator = torch.Generator(device=self.dropout.device)
        self.seed = seed
        self.last_p: Optional[float] = None

    def probability(self, progress: Progress) -> float:
        return self.curriculum.probability(progress)

    @contextmanager
    def step(self, progress: Progress, micro: int = 0) -> Iterator[Optional[torch.Tensor]]:
        """Mask for one micro-batch of optimizer step ``progress.step``; restore on exit."""
        p = self.probability(progress)
        self.last_p = p
        if p > 0:
            self.generator.manual_seed(mask_seed(self.seed, progress.step, micro))
        with self.dropout.masked(p, self.generator) as keep:
            yield keep


def _rank0_first_token(inputs: Any, tokenizer: Any):
    """The first training batch's position-0 token as rank 0 sees it, on every rank (all ranks
    must probe the same candidates: a sharded model runs each probe on all ranks together)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    first = None
    if isinstance(inputs, Mapping) and (not distributed or torch.distributed.get_rank() == 0):
        first = batch_first_token(inputs, tokenizer)
    if distributed:
        payload = [first]
        torch.distributed.broadcast_object_list(payload, src=0)
        first = payload[0]
    return first


def _broadcast_result(result: LocatorResult) -> LocatorResult:
    """Make every rank use rank 0's locator result (same layer and indices everywhere)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        payload = [result.to_dict()]
        torch.distributed.broadcast_object_list(payload, src=0)
        return LocatorResult.from_dict(payload[0])
    return result


class MacDropTrainerMixin:
    """Mix in FRONT of a transformers Trainer class; set ``macdrop_config`` on the class."""

    macdrop_config: MacDropConfig
    _macdrop_run: Optional[MacDropRun] = None
    _macdrop_micro: tuple[int, int] = (0, -1)  # (optimizer step, micro-batch index)
    _macdrop_first_inputs: Any = None  # the first micro-batch, for the probe's first candidate

    # ------------------------------------------------------------------ set-up
    def macdrop_setup(self) -> MacDropRun:
        """Locate (once per run) and build the dropout; called lazily at the first step.

        Lazily, because under ZeRO-3 forward passes only work once the engine exists, and
        because the model must already carry its adapters (the targets are their base layers).
        ``self._macdrop_first_inputs``: the first micro-batch (set by ``training_step``), whose
        position-0 token is the first probe candidate.
        """
        cfg = self.macdrop_config
        model = self.model
        blocks = find_ffn_blocks(model)
        path = os.path.join(self.args.output_dir, LOCATOR_FILE)
        first_inputs, self._macdrop_first_inputs = self._macdrop_first_inputs, None  # not kept for the run
        if self.state.global_step > 0 and os.path.isfile(path):
            # resumed from a checkpoint: drop exactly the rows the interrupted run dropped
            result = reuse_result(path, model, blocks, cfg.macdrop_k, cfg.macdrop_layer, cfg.macdrop_indices)
            if self.is_world_process_zero():
                logger.info("%s\n  reused from %s (resuming at step %d)", result.table(), path, self.state.global_step)
        else:
            # Every rank runs the probe (a sharded model needs all ranks in the forward pass);
            # rank 0's answer is then used everywhere.
            tokenizer = getattr(self, "processing_class", None)
            first = _rank0_first_token(first_inputs, tokenizer) if cfg.macdrop_probe_token is None else None
            result = locate_massive_weights(
                model,
                cfg.macdrop_k,
                tokenizer=tokenizer,
                first_token=first,
                probe_token=cfg.macdrop_probe_token,
                layer=cfg.macdrop_layer,
                indices=cfg.macdrop_indices,
                blocks=blocks,
            )
            result = _broadcast_result(result)
            if self.is_world_process_zero():
                result.write_json(path)
                logger.info("%s\n  written to %s", result.table(), path)
                for w in result.warnings:
                    logger.warning(w)
        self._macdrop_run = MacDropRun(cfg, result, blocks, seed=self.args.seed, model=model)
        return self._macdrop_run

    def macdrop_progress(self) -> Progress:
        state = self.state
        total = max(int(state.max_steps), 1)
        epochs = max(int(getattr(state, "num_train_epochs", 1) or 1), 1)
        step = min(int(state.global_step) + 1, total)
        epoch = min(int(state.epoch or 0) + 1, epochs)
        return Progress(step=step, total_steps=total, epoch=epoch, num_epochs=epochs)

    # ------------------------------------------------------------------ trainer hooks
    def training_step(self, model, inputs, *args, **kwargs):
        if self._macdrop_run is None:
            self._macdrop_first_inputs = inputs
        run = self._macdrop_run or self.macdrop_setup()
        progress = self.macdrop_progress()
        last_step, last_micro = self._macdrop_micro
        micro = last_micro + 1 if last_step == progress.step else 0
        self._macdrop_micro = (progress.step, micro)
        with run.step(progress, micro):
            return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._macdrop_run is not None and self._macdrop_run.last_p is not None:
            logs["macdrop_p"] = self._macdrop_run.last_p
        return super().log(logs, *args, **kwargs)


class MacDropDPOTrainerMixin(MacDropTrainerMixin):
    """DPO: the reference forward (the same model with its adapter disabled) sees the original rows."""

    def compute_reference_log_probs(self, *args: Any, **kwargs: Any):
        run = self._macdrop_run
        if run is None:
            return super().compute_reference_log_probs(*args, **kwargs)
        with run.dropout.unmasked():
            return super().compute_reference_log_probs(*args, **kwargs)
