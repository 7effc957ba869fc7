"""Run one LLaMA-Factory training (single process or under torchrun) and record, FROM OUTSIDE, what
the massive layer's weights looked like in every forward.

Usage: ``python dist_check.py ARGS.json TRACE_DIR [ORACLE.json]`` (or ``torchrun ... dist_check.py ...``).

``ARGS.json`` holds LLaMA-Factory arguments plus ``macdrop_*`` keys, passed to the patched
``run_exp`` exactly as ``llamafactory-cli train`` would. ``ORACLE.json`` says which layer the
planted model's massive weights sit in (default: tests/helpers/tiny.py's planted Llama) and, for MoE
models, which expert. ``TRACE_DIR/rank{R}.pt`` receives, per rank:

* ``forward``: for every forward of the watched layer's up projection (gradient-checkpoint
  recomputation and DPO's reference forward included): the optimizer step and the layer's
  EFFECTIVE up and gate weights at that moment, whole;
* ``original``: the same, measured the same way before the first step;
* ``bytes_before`` / ``bytes_after``: the raw storage bytes of those weights before training and
  after every optimizer step (what a bitwise restore must reproduce, whatever the storage);
* ``storage``: what the storage looked like (partitioned, sharded, quantized), seen from outside.

Nothing here imports ``llamafactory_macdrop``: an oracle must not share code with what it checks.
The effective weight of a bias-free linear layer is measured through the layer's OWN forward on
an identity input, ``W = forward(I).T`` (whatever the storage: dense, a ZeRO-3 gathered
partition, an FSDP unsharded view, bitsandbytes 4-bit codes in any layout); ``type(m).forward``
bypasses module hooks, so the measurement does not trigger ZeRO-3/FSDP gathers or releases and
cannot recurse. The input requires grad, so bitsandbytes never repacks its CPU layout for it.
Fused MoE experts (a 3-D parameter, no linear module) are read as the experts module sees them
in its own forward pre-hook, where ZeRO-3 has gathered them. The masks the plugin should have
drawn come from :func:`expected_keep`, an independent re-implementation of the rule published in
docs/how-it-works.md.

Used by tests/plugin/test_distributed.py on CPU and by tests/gpu/check_gpu.py on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
from transformers import TrainerCallback

PLANTED = {"layer": 1, "indices": [97, 13, 64, 5, 120], "expert": None}  # tests/helpers/tiny.py


# ----------------------------------------------------------------------------- measuring
def find_ffn(model, layer: int):
    """(kind, modules) of decoder layer ``layer``'s FFN, found by parameter names (HF conventions),
    adapters seen through: ('linear', {'up': m, 'gate': m}) or ('experts', {'experts': m})."""
    suffix = f"layers.{layer}.mlp"
    for name, module in model.named_modules():
        name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        if not name.endswith(suffix):
            continue
        if hasattr(module, "experts") and hasattr(module.experts, "gate_up_proj"):
            return "experts", {"experts": module.experts}
        out = {}
        for key, attr in (("up", "up_proj"), ("gate", "gate_proj")):
            m = getattr(module, attr, None)
            m = getattr(m, "base_layer", m)  # peft's LoRA/DoRA wrapper keeps the frozen layer here
            if m is not None:
                out[key] = m
        return "linear", out
    raise AssertionError(f"no module named *{suffix} in {type(model).__name__}")


def effective_weight(module) -> torch.Tensor:
    """W as ``module`` computes with it: ``forward(I).T``, float32 on the CPU (exact: one nonzero
    input per output element)."""
    weight = module.weight
    n_in = getattr(module, "in_features", None) or weight.shape[-1]
    dtype = getattr(module, "compute_dtype", None) or (weight.dtype if weight.is_floating_point() else torch.float32)
    if getattr(weight, "ds_tensor", None) is not None and weight.numel() == 0:
        raise AssertionError("effective_weight called on a released ZeRO-3 parameter")
    eye = torch.eye(n_in, dtype=dtype, device=weight.device, requires_grad=True)
    with torch.enable_grad():
        out = type(module).forward(module, eye)
    return out.detach().float().t().cpu().clone()


def expert_weight(experts, expert: int) -> dict:
    """An expert's gate and up halves of the fused ``gate_up_proj`` [E, 2I, H], as the module has it now."""
    w = experts.gate_up_proj.detach()[expert].float().cpu().clone()
    gate, up = w.chunk(2, dim=0)
    return {"gate": gate, "up": up}


def storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor's data (the packed codes of a quantized weight included)."""
    return tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().clone()


def describe_storage(weight: torch.Tensor) -> dict:
    return {
        "type": type(weight).__name__,
        "dtype": str(weight.dtype),
        "zero3_partitioned": getattr(weight, "ds_tensor", None) is not None,
        "local_numel": int(weight.numel()),
        "quantized": getattr(weight, "quant_state", None) is not None,
        "quant_storage": str(weight.dtype) if getattr(weight, "quant_state", None) is not None else None,
    }


# ----------------------------------------------------------------------------- recording
def _is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor")


class Recorder(TrainerCallback):
    """Hooks the watched layer at the start of training (before the plugin's first step, which
    locates and then masks) and records what every TRAINING forward computes with; the
    locator's probe and evaluation passes run in eval mode and are not recorded."""

    def __init__(self, oracle: dict) -> None:
        self.oracle = oracle
        self.trace = {"forward": [], "bytes_after": [], "oracle": oracle}
        self.step = 0
        self.fsdp1_root = None

    def begin(self, model, wrapped) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        self.fsdp1_root = wrapped if isinstance(wrapped, FSDP) else None
        self.trace["engine"] = type(wrapped).__name__
        self.kind, self.modules = find_ffn(model, self.oracle["layer"])
        expert = self.oracle.get("expert")
        if self.kind == "linear":

            def measure():
                return {k: effective_weight(m) for k, m in self.modules.items()}

            def pre_hook(module, hook_args):
                if module.training:
                    self.trace["forward"].append((self.step, measure()))

            self.modules["up"].register_forward_pre_hook(pre_hook)
            self.attr = "weight"
        else:
            experts = self.modules["experts"]

            def measure():
                return expert_weight(experts, expert)

            def pre_hook(module, hook_args, hook_kwargs):
                if module.training:
                    self.trace["forward"].append((self.step, measure()))

            experts.register_forward_pre_hook(pre_hook, with_kwargs=True)
            self.attr = "gate_up_proj"
        params = [getattr(m, self.attr) for m in self.modules.values()]
        self.trace["storage"] = {k: describe_storage(getattr(m, self.attr)) for k, m in self.modules.items()}
        self.trace["device"] = str(params[0].device)
        with self._whole():
            if any(_is_dtensor(p) for p in params):  # FSDP2 outside forward: DTensors of the real shape
                self.trace["original"] = self._fsdp2_original(expert)
            else:
                self.trace["original"] = measure()
        self.trace["bytes_before"] = self._stored()

    def _fsdp2_original(self, expert):
        full = {k: getattr(m, self.attr).full_tensor().detach().float().cpu() for k, m in self.modules.items()}
        if self.kind == "linear":
            return full
        gate, up = full["experts"][expert].chunk(2, dim=0)
        return {"gate": gate, "up": up}

    @contextlib.contextmanager
    def _whole(self):
        """The watched weights whole for reading (a collective: every rank calls it): ZeRO-3
        parameters gathered, FSDP1 parameters summoned; FSDP2 DTensors are read with full_tensor()."""
        params = [getattr(m, self.attr) for m in self.modules.values()]
        if any(getattr(p, "ds_tensor", None) is not None for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        elif self.fsdp1_root is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(self.fsdp1_root, writeback=False):
                yield
        else:
            yield

    def _stored(self) -> dict:
        """What a bitwise restore must reproduce: the whole weight's bytes as stored (the packed
        codes and their scales for a quantized weight), gathered for sharded storage."""
        out = {}
        with self._whole():
            for key, module in self.modules.items():
                w = getattr(module, self.attr)
                w = w.full_tensor() if _is_dtensor(w) else w
                out[key] = storage_bytes(w)
                state = getattr(w, "quant_state", None)
                if state is not None:
                    out[key + ".absmax"] = storage_bytes(state.absmax)
        return out

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def on_step_end(self, args, state, control, **kwargs):
        self.trace["bytes_after"].append((state.global_step, self._stored()))


# ----------------------------------------------------------------------------- the rule, re-implemented
_MIX = 0x9E3779B97F4A7C15
_M63 = (1 << 63) - 1


def reference_seed(seed: int, step: int, micro: int) -> int:
    """The mask seed of docs/how-it-works.md ("Masks, seeds and ranks"), re-implemented."""
    h = seed & _M63
    for part in (step, micro):
        h = ((h ^ (part & _M63)) * _MIX + 0x632BE59BD9B4E019) & _M63
    return h


def step_p(p0: float, step: int, steps: int) -> float:
    """The paper's step curriculum p = p0 (1 - t/T)."""
    return min(1.0, max(0.0, p0 * (1.0 - step / steps)))


def expected_keep(seed: int, step: int, micro: int, p: float, shape, device: str = "cpu") -> torch.Tensor:
    """Algorithm 1's keep-mask M = (U > p), U ~ Uniform[0, 1), from a generator on ``device``
    (CUDA's and the CPU's generators give different streams for one seed)."""
    if p <= 0:
        return torch.ones(shape, dtype=torch.bool)
    gen = torch.Generator(device=device).manual_seed(reference_seed(seed, step, micro))
    return (torch.rand(tuple(shape), generator=gen, device=device) > p).cpu()


def expected_masks(
    seed: int, steps: int, ga: int, p0: float, shape, device: str = "cpu", per: str = "optimizer_step"
) -> list:
    """(step, keep-mask) per micro-batch: one mask per optimizer step by default
    (``macdrop_mask_per: optimizer_step``), one per micro-batch with ``per="micro_batch"``."""
    out = []
    for step in range(1, steps + 1):
        p = step_p(p0, step, steps)
        for micro in range(ga):
            out.append((step, expected_keep(seed, step, micro if per == "micro_batch" else 0, p, shape, device)))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern for exact comparison, with -0.0 read as 0.0 (a dropped element is "exactly 0"
    whether the storage holds original * 0 = -0.0 or a zero written by a layer's forward)."""
    return (t + 0.0).contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def check_forward(seen: dict, original: dict, rows: list, keep) -> None:
    """Every element outside ``rows`` bitwise unchanged; inside, original where kept and exactly
    0 where dropped (``keep`` None: the original everywhere)."""
    for key, w in seen.items():
        want = original[key].clone()
        if keep is not None:
            want[rows] = torch.where(keep, want[rows], torch.zeros_like(want[rows]))
        if not torch.equal(_bits(w), _bits(want)):
            diff = w != want
            outside = diff.clone()
            outside[rows] = False
            raise AssertionError(
                f"{key}: {int(diff.sum())} elements differ from Algorithm 1's weight, "
                f"{int(outside.sum())} of them outside the masked rows"
            )


def verify(
    traces: list,
    *,
    layer: int,
    indices: list,
    seed: int,
    steps: int,
    ga: int,
    p0: float = 0.8,
    zero3: bool = False,
    recompute: bool = True,
    reference: bool = False,
    per: str = "optimizer_step",
    located: dict | None = None,
    original: dict | None = None,
    first_step: int = 1,
) -> list[str]:
    """Assert Algorithm 1 on every rank's trace; returns what was checked (for printing).

    Per micro-batch the forwards of W_up are: the training forward (masked), with ``reference``
    (DPO) the reference forward (adapter disabled, no grad: must see the ORIGINAL weights), then
    with ``recompute`` the gradient-checkpoint recomputation in backward (masked again).
    ``located``: the run's macdrop_locator.json, whose layer/indices must be the planted ones.
    ``original``: the weights the run must start from (e.g. read from the checkpoint file);
    default: each rank's own measurement before the first step. ``first_step``: the first step
    this run trained (a run resumed after step N trains from N + 1 on)."""
    located = located or traces[0].get("located")
    if located is not None:
        assert located["layer"] == layer, located
        assert located["indices"] == indices, located
    rows = list(indices)
    pattern = ["masked"] + (["original"] if reference else []) + (["masked"] if recompute else [])
    per_micro = len(pattern)
    for rank, trace in enumerate(traces):
        assert all(s["zero3_partitioned"] == zero3 for s in trace["storage"].values()), trace["storage"]
        start = trace["original"]
        if original is not None:
            for key in start:
                assert torch.equal(start[key], original[key]), f"rank {rank}: {key} before training != checkpoint"
        shape = (len(rows), next(iter(start.values())).shape[1])
        expected = [m for m in expected_masks(seed, steps, ga, p0, shape, trace["device"], per) if m[0] >= first_step]
        seen = trace["forward"]
        assert len(seen) == per_micro * len(expected), (len(seen), len(expected))
        for i, (step, keep) in enumerate(expected):
            for kind, (step_seen, weights) in zip(pattern, seen[per_micro * i : per_micro * (i + 1)]):
                assert step_seen == step, (rank, i, step_seen, step)
                try:
                    check_forward(weights, start, rows, keep if kind == "masked" else None)
                except AssertionError as err:
                    raise AssertionError(f"rank {rank} step {step} micro {i % ga} {kind}: {err}") from None
        assert [s for s, _ in trace["bytes_after"]] == list(range(first_step, steps + 1))
        for step, after in trace["bytes_after"]:
            for key, before in trace["bytes_before"].items():
                assert torch.equal(after[key], before), f"rank {rank}: {key} storage not restored after step {step}"
    if len(traces) > 1:  # the same weights in every forward on every rank
        for rank, trace in enumerate(traces[1:], 1):
            for (s0, w0), (s1, w1) in zip(traces[0]["forward"], trace["forward"]):
                assert s0 == s1, f"rank {rank} differs from rank 0"
                assert all(torch.equal(w0[k], w1[k]) for k in w0), f"rank {rank} differs from rank 0"
    drops = sum(int((~keep).sum()) for _, keep in expected)
    return [
        f"{len(traces)} rank(s) located layer {layer}, indices {indices}" if located else f"{len(traces)} rank(s)",
        f"{len(expected) * per_micro} forwards per rank: effective W_up/W_gate = Algorithm 1's weight "
        f"(outside the rows bitwise unchanged, {drops} dropped elements exactly 0, the rest original)"
        + (", the reference forwards the original" if reference else ""),
        "same weights in every forward on every rank" if len(traces) > 1 else "single rank",
        "storage bytes bitwise restored after each of %d optimizer steps" % (steps - first_step + 1),
        "ZeRO-3 partitioned targets" if zero3 else "unpartitioned targets",
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
    oracle = dict(PLANTED)
    if len(sys.argv) > 3:
        oracle.update(json.load(open(sys.argv[3])))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available():
        allow_fsdp_on_cpu()
    args = json.load(open(args_path))
    from llamafactory.train import (
        tuner,  # the .pth start-up hook activates the plugin here, as for users
    )

    assert getattr(tuner.run_exp, "__macdrop_patched__", False), "the MacDrop start-up hook did not patch run_exp"
    recorder = Recorder(oracle)
    import transformers

    inner = transformers.Trainer._inner_training_loop

    def loop(trainer, *a, **kw):
        # the wrapped model (DeepSpeed engine, FSDP) exists only inside the loop: hook it at on_train_begin
        original_begin = recorder.on_train_begin

        def on_train_begin(targs, state, control, **kwargs):
            recorder.begin(trainer.model, trainer.model_wrapped)
            return original_begin(targs, state, control, **kwargs)

        recorder.on_train_begin = on_train_begin
        return inner(trainer, *a, **kw)

    transformers.Trainer._inner_training_loop = loop
    _leave_together()
    tuner.run_exp(args, callbacks=[recorder])
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(trace_dir, exist_ok=True)
    torch.save(recorder.trace, os.path.join(trace_dir, f"rank{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the trace is the harness's whole result; skip the C++ teardown of the CPU communicators
        # (one rank aborted there once on a loaded 2-core CI box, after training and saving were done)
        os._exit(0)


def _leave_together() -> None:
    """run_exp ends with destroy_process_group on each rank as soon as it is done; under ZeRO-3 a
    non-zero rank got there while rank 0 was still saving. A barrier first makes the ranks leave
    together (harness only; the same without MacDrop)."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_after_barrier(*a, **kw):
        if dist.is_initialized():
            dist.barrier()
        return destroy(*a, **kw)

    dist.destroy_process_group = destroy_after_barrier


if __name__ == "__main__":
    main()
