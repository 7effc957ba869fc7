"""Run one LLaMA-Factory training (single process or under torchrun) and record what MacDrop did.

Usage: ``python dist_check.py ARGS.json TRACE_DIR`` (or ``torchrun ... dist_check.py ...``).

``ARGS.json`` holds LLaMA-Factory arguments plus ``macdrop_*`` keys, passed to the patched
``run_exp`` exactly as ``llamafactory-cli train`` would. ``TRACE_DIR/rank{R}.pt`` receives, per rank:

* ``forward``: for every forward of the massive layer's W_up (gradient-checkpoint recomputation
  included) the optimizer step and the rows at the located indices AS THE LAYER SAW THEM (under
  ZeRO-3 that is the gathered weight, i.e. what every rank's partition edits add up to);
* ``after_step``: the same rows after each optimizer step (gathered under ZeRO-3);
* ``original`` / ``final``: the full W_up/W_gate of that layer when the plugin set up (before
  any mask) and at the end of training (gathered; dequantized for 4-bit QLoRA weights).

Used by tests/test_distributed.py on CPU and by tests/gpu/check_gpu.py on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
from transformers import TrainerCallback


@contextlib.contextmanager
def full_weights(model, modules: dict):
    """The modules' whole weights (a collective under ZeRO-3/FSDP: every rank calls it), as
    ``{key: dense float32 copy}``: gathered for ZeRO-3, summoned for FSDP1, ``full_tensor()`` of
    the DTensor for FSDP2."""
    from llamafactory_macdrop.masking import uses_fsdp

    params = [m.weight for m in modules.values()]
    if any(hasattr(p, "ds_tensor") for p in params):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    elif uses_fsdp(model) == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        ctx = FSDP.summon_full_params(model, writeback=False)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        out = {}
        for key, module in modules.items():
            w = module.weight
            out[key] = w.full_tensor().float().cpu() if hasattr(w, "full_tensor") else dense(w)
        yield out


def dense(weight) -> torch.Tensor:
    """The weight as the layer computes with it (dequantized if 4-bit), float32 on the CPU."""
    from llamafactory_macdrop.masking import is_packed_4bit

    if is_packed_4bit(weight):
        import bitsandbytes.functional as bnb_f

        return bnb_f.dequantize_4bit(weight.data, weight.quant_state).float().cpu()
    return weight.data.float().cpu().clone()  # a copy: FSDP frees or reuses the storage it views


class Recorder(TrainerCallback):
    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.trace = {"forward": [], "after_step": [], "final": {}}
        self.step = 0
        self.rows = None
        self.model = None
        self.modules = {}

    def _setup(self, model, located: dict) -> None:
        from llamafactory_macdrop.architectures import base_layer, find_ffn_blocks

        block = {b.index: b for b in find_ffn_blocks(model)}[located["layer"]]
        self.rows = torch.tensor(located["indices"])
        self.model = model
        self.modules = {"up": base_layer(block.up), "gate": base_layer(block.gate)}
        self.trace["located"] = located
        self.trace["dtype"] = str(self.modules["up"].weight.dtype)

        def pre_hook(module, args):  # inside forward: the weight as gathered for this layer
            self.trace["forward"].append((self.step, dense(module.weight)[self.rows]))

        with full_weights(model, self.modules) as weights:
            self.trace["original"] = weights

        base_layer(block.up).register_forward_pre_hook(pre_hook)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.step = state.global_step + 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        with full_weights(self.model, self.modules) as weights:
            self.trace["after_step"].append((state.global_step, {k: w[self.rows] for k, w in weights.items()}))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with full_weights(self.model, self.modules) as weights:
            self.trace["final"] = weights


def expected_masks(seed: int, steps: int, ga: int, p0: float, shape, device: str = "cpu") -> list:
    """(step, keep-mask) per micro-batch, as Algorithm 1 with the plugin's seeding draws them.

    ``device``: where the plugin drew them (its generator lives on the weights' device; CUDA's
    and the CPU's generators give different streams for one seed)."""
    from llamafactory_macdrop.curriculum import Progress, build_curriculum
    from llamafactory_macdrop.masking import draw_keep_mask
    from llamafactory_macdrop.trainer import mask_seed

    curriculum, out = build_curriculum("step", p0, 0.01), []
    for step in range(1, steps + 1):
        p = curriculum.probability(Progress(step=step, total_steps=steps, epoch=1, num_epochs=1))
        for micro in range(ga):
            gen = torch.Generator(device=device).manual_seed(mask_seed(seed, step, micro))
            keep = draw_keep_mask(shape, p, gen, device).cpu() if p > 0 else torch.ones(shape, dtype=torch.bool)
            out.append((step, keep))
    return out


def verify(traces: list, *, layer: int, indices: list, seed: int, steps: int, ga: int, p0: float = 0.8,
           zero3: bool = False, recompute: bool = True, reference: bool = False) -> list[str]:
    """Assert Algorithm 1 on every rank's trace; returns what was checked (for printing).

    Per micro-batch the forwards of W_up are: the training forward (masked), with ``reference``
    (DPO) the reference forward (adapter disabled, no grad: must see the ORIGINAL rows), then
    with ``recompute`` the gradient-checkpoint recomputation in backward (masked again)."""
    from llamafactory_macdrop.masking import bits

    shape = tuple(traces[0]["original"]["up"][indices].shape)
    expected = expected_masks(seed, steps, ga, p0, shape, traces[0]["mask_device"])
    pattern = ["masked"] + (["original"] if reference else []) + (["masked"] if recompute else [])
    per_micro = len(pattern)
    for rank, trace in enumerate(traces):
        assert trace["located"]["layer"] == layer and trace["located"]["indices"] == indices, trace["located"]
        assert all(trace["zero3_partitioned"]) == zero3, trace["zero3_partitioned"]
        original = trace["original"]["up"][indices]
        seen = trace["forward"]
        assert len(seen) == per_micro * len(expected), (len(seen), len(expected))
        for i, (step, keep) in enumerate(expected):
            for kind, (step_seen, rows) in zip(pattern, seen[per_micro * i: per_micro * (i + 1)]):
                want = original * keep if kind == "masked" else original
                assert step_seen == step and torch.equal(rows, want), f"rank {rank} step {step} micro {i % ga} {kind}"
        assert [s for s, _ in trace["after_step"]] == list(range(1, steps + 1))
        for _, rows in trace["after_step"]:
            for key in ("up", "gate"):
                assert torch.equal(bits(rows[key]), bits(trace["original"][key][indices]))
        for key in ("up", "gate"):
            assert torch.equal(bits(trace["final"][key]), bits(trace["original"][key]))
    return [
        f"{len(traces)} rank(s) located layer {layer}, indices {indices}",
        f"{len(expected) * per_micro} forwards of W_up per rank saw original * M, M = Algorithm 1's mask (oracle)"
        + (", the reference forwards the original rows" if reference else ""),
        "same mask on every rank" if len(traces) > 1 else "single rank",
        "W_up/W_gate bitwise restored after each of %d optimizer steps and at the end" % steps,
        "ZeRO-3 partitioned targets" if zero3 else "replicated targets",
    ]


def allow_fsdp_on_cpu() -> None:
    """Let accelerate use FSDP on CPU ranks (gloo), for the CPU tests only.

    accelerate 1.11 switches to FSDP only for accelerator devices (MULTI_GPU, MULTI_NPU, ...); on
    CPU ranks it silently stays MULTI_CPU (plain DDP) even with ACCELERATE_USE_FSDP=true. torch's
    FSDP1 and FSDP2 themselves run on CPU with gloo, so this turns the CPU case into the GPU one:
    the same plugin object, the same ``distributed_type``. Production code never does this.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # MULTI_CPU names the device cpu:0, which FSDP1 finds inconsistent with its params' "cpu"
            self.device = PartialState._shared_state["device"] = torch.device("cpu")

    AcceleratorState.__init__ = __init__


def main() -> None:
    args_path, trace_dir = sys.argv[1], sys.argv[2]
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available():
        allow_fsdp_on_cpu()
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
        recorder.trace["fsdp_sharded"] = [type(t.shard).__name__ if t.shard is not None else None
                                          for t in run.dropout.targets]
        recorder.trace["engine"] = type(self.model_wrapped).__name__
        recorder.trace["mask_device"] = str(run.dropout.device)
        return run

    mixin.MacDropTrainerMixin.macdrop_setup = setup
    tuner.run_exp(args, callbacks=[recorder])
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(trace_dir, exist_ok=True)
    torch.save(recorder.trace, os.path.join(trace_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
