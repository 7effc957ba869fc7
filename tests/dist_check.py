"""Run one LLaMA-Factory training (single process or under torchrun) and record what MacDrop did.

Usage: ``python dist_check.py ARGS.json TRACE_DIR`` (or ``torchrun ... dist_check.py ...``).

``ARGS.json`` holds LLaMA-Factory arguments plus ``macdrop_*`` keys, passed to the patched
``run_exp`` exactly as ``llamafactory-cli train`` would. ``TRACE_DIR/rank{R}.pt`` receives, per rank:

* ``forward``: for every forward of the massive layer's W_up (gradient-checkpoint recomputation
  included) the optimizer step and the rows at the located indices AS THE LAYER SAW THEM (under
  ZeRO-3 that is the gathered weight, i.e. what every rank's partition edits add up to);
* ``after_step``: the same rows after each optimizer step (gathered under ZeRO-3);
* ``final``: the full W_up/W_gate of that layer at the end of training (gathered).

Used by tests/test_distributed.py on CPU and by tests/gpu/check_gpu.py on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
from transformers import TrainerCallback


def _gathered(params):
    if any(hasattr(p, "ds_tensor") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class Recorder(TrainerCallback):
    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.trace = {"forward": [], "after_step": [], "final": {}}
        self.step = 0
        self.rows = None
        self.weights = {}

    def _setup(self, model, located: dict) -> None:
        from llamafactory_macdrop.architectures import base_layer, find_ffn_blocks

        block = {b.index: b for b in find_ffn_blocks(model)}[located["layer"]]
        self.rows = torch.tensor(located["indices"])
        self.weights = {"up": base_layer(block.up).weight, "gate": base_layer(block.gate).weight}
        self.trace["located"] = located

        def pre_hook(module, args):
            w = module.weight.data
            self.trace["forward"].append((self.step, w.view(-1, w.shape[-1])[self.rows.to(w.device)].float().cpu()))

        base_layer(block.up).register_forward_pre_hook(pre_hook)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.step = state.global_step + 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        with _gathered(list(self.weights.values())):
            self.trace["after_step"].append(
                (state.global_step, {k: w.data[self.rows.to(w.device)].float().cpu() for k, w in self.weights.items()})
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with _gathered(list(self.weights.values())):
            self.trace["final"] = {k: w.data.float().cpu().clone() for k, w in self.weights.items()}


def main() -> None:
    args_path, trace_dir = sys.argv[1], sys.argv[2]
    args = json.load(open(args_path))
    from llamafactory.train import tuner

    from llamafactory_macdrop import integration

    integration.activate()  # no-op when the start-up hook already patched the tuner
    recorder = Recorder(args["output_dir"])
    # Hook W_up right after the plugin located (at the first training step, before its forward),
    # with THIS rank's locator result.
    from llamafactory_macdrop import trainer as mixin

    original_setup = mixin.MacDropTrainerMixin.macdrop_setup

    def setup(self):
        run = original_setup(self)
        recorder._setup(self.model, run.result.to_dict())
        recorder.trace["zero3_partitioned"] = [t.zero3 for t in run.dropout.targets]
        recorder.trace["engine"] = type(self.model_wrapped).__name__
        return run

    mixin.MacDropTrainerMixin.macdrop_setup = setup
    tuner.run_exp(args, callbacks=[recorder])
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(trace_dir, exist_ok=True)
    torch.save(recorder.trace, os.path.join(trace_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
