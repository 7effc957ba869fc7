"""The training loop around Algorithm 1, through LLaMA-Factory's own run_exp on the planted tiny
Llama: which mask each forward sees (one per optimizer step, or one per micro-batch), what DoRA
makes of a masked row, a run going non-finite, epoch curricula that would degenerate, and one
error line from torchrun children (raised on every rank, or on rank 1 alone).

The oracle never asks the plugin: a forward pre-hook on the planted layer's W_up base layer
(found by name) computes the weight the layer really uses through its own forward on an identity
input, and the masks are read off as that weight's exact zeros.
"""

import json
import logging
import math
import os
import subprocess
import time

import pytest
import torch
import yaml
from helpers import tiny
from helpers.process import BIN, REPO
from safetensors.torch import load_file
from transformers import TrainerCallback

from llamafactory_macdrop.plugin import integration

UP = f"layers.{tiny.PLANTED_LAYER}.mlp.up_proj"
IDX = torch.tensor(tiny.PLANTED_INDICES)


def run_in_process(args, callbacks=()):
    integration.activate()
    from llamafactory.train.tuner import run_exp

    run_exp(args, callbacks=list(callbacks))


def module_named(model, suffix):
    (found,) = [m for name, m in model.named_modules() if name.endswith(suffix)]
    return found


def effective_weight(module):
    """[out, in] weight a bias-free linear layer computes with, measured through its own forward."""
    eye = torch.eye(module.in_features)  # the tiny model trains in fp32
    return type(module).forward(module, eye).T


class SeenMasks(TrainerCallback):
    """Per optimizer step, the zero pattern of the planted rows at every forward of W_up's base layer
    (gradient-checkpoint recomputation included)."""

    def __init__(self):
        self.by_step, self.steps_ended, self._inside = {}, 0, False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = state
        module_named(model, UP + ".base_layer").register_forward_pre_hook(self.seen)

    def seen(self, module, args):
        if self._inside or not module.training:  # the locator's probe runs in eval mode, unmasked
            return
        self._inside = True
        try:
            with torch.no_grad():
                rows = effective_weight(module)[IDX]
            self.by_step.setdefault(self.state.global_step + 1, []).append(rows == 0)
        finally:
            self._inside = False

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_ended += 1


def distinct(patterns):
    out = []
    for p in patterns:
        if not any(torch.equal(p, q) for q in out):
            out.append(p)
    return out


@pytest.fixture(scope="module")
def layouts(tiny_llama_dir, tiny_data_dir, tmp_path_factory):
    """Masks seen with the same global batch of 4 split as 4 x GA 1 and 2 x GA 2, per mask_per."""
    out = {}
    for name, batch, accum, per in (
        ("b4ga1", 4, 1, "optimizer_step"),
        ("b2ga2", 2, 2, "optimizer_step"),
        ("b2ga2_micro", 2, 2, "micro_batch"),
    ):
        seen = SeenMasks()
        args = tiny.lf_train_args(
            tiny_llama_dir,
            tiny_data_dir,
            tmp_path_factory.mktemp(name),
            max_steps=3,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            macdrop_curriculum="constant",
            macdrop_p0=0.5,
            macdrop_mask_per=per,
        )
        if per == "optimizer_step":
            del args["macdrop_mask_per"]  # the default
        run_in_process(args, [seen])
        out[name] = seen.by_step
    return out


def test_one_mask_per_optimizer_step_whatever_the_batch_split(layouts):
    for name in ("b4ga1", "b2ga2"):
        assert sorted(layouts[name]) == [1, 2, 3]
        for step, patterns in layouts[name].items():
            assert len(patterns) >= (2 if name == "b2ga2" else 1)
            assert len(distinct(patterns)) == 1, (name, step)  # every forward (and recompute) of the step
            assert 0.3 < patterns[0].float().mean().item() < 0.7  # p = 0.5 of the rows' elements dropped
    for step in (1, 2, 3):
        assert torch.equal(layouts["b4ga1"][step][0], layouts["b2ga2"][step][0]), step
    assert not torch.equal(layouts["b4ga1"][1][0], layouts["b4ga1"][2][0])  # a new mask every step


def test_micro_batch_mode_draws_a_mask_per_micro_batch(layouts):
    for step, patterns in layouts["b2ga2_micro"].items():
        assert len(distinct(patterns)) == 2, step  # two micro-batches, two masks (recomputes repeat them)
    # its first micro-batch uses the seed the default uses for the whole step
    assert torch.equal(layouts["b2ga2_micro"][1][0], layouts["b2ga2"][1][0])


def test_dora_rescales_the_kept_elements_of_a_masked_row(tiny_llama_dir, tiny_data_dir, tmp_path):
    """peft's DoRA computes m * (W ⊙ M) / ||W ⊙ M||_row with m = ||W||_row at the start: the kept
    elements of a masked row are scaled by ||W_i|| / ||W_i ⊙ M_i||, not left alone as in Algorithm 1."""
    seen = {}

    class DoraWeight(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layer = module_named(model, UP)

            def hook(module, inputs):
                if seen or not module.training:  # the first TRAINING forward (the probe runs in eval mode)
                    return
                with torch.no_grad():
                    seen["base"] = effective_weight(module.get_base_layer()).clone()
                    seen["dora"] = effective_weight(module).clone()

            layer.register_forward_pre_hook(hook)

    args = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        tmp_path,
        use_dora=True,
        max_steps=1,
        gradient_accumulation_steps=1,
        macdrop_curriculum="constant",
        macdrop_p0=0.5,
    )
    run_in_process(args, [DoraWeight()])
    original = load_file(tiny_llama_dir / "model.safetensors")[f"model.{UP}.weight"]
    base, dora = seen["base"], seen["dora"]
    keep = base[IDX] != 0
    assert 0.3 < 1 - keep.float().mean().item() < 0.7
    masked = original[IDX] * keep
    scale = original[IDX].norm(dim=1) / masked.norm(dim=1)
    torch.testing.assert_close(dora[IDX], masked * scale[:, None], rtol=1e-5, atol=1e-6)
    others = torch.ones(original.shape[0], dtype=torch.bool)
    others[IDX] = False
    torch.testing.assert_close(dora[others], original[others], rtol=1e-5, atol=1e-6)  # unmasked rows: DoRA = W
    # not Algorithm 1's 1, and not 1/sqrt(1-p) either: it depends on WHICH elements drop. A planted row
    # is dominated by its massive entry: dropping it scales the rest by ~30-90, keeping it by ~1.
    assert (scale >= 1.0).all()
    assert (scale > 10).any()
    print("DoRA row scales", [round(v, 3) for v in scale.tolist()], "1/sqrt(1-p) =", round(1 / math.sqrt(0.5), 3))


class PlantNaN(TrainerCallback):
    """At the start of optimizer step ``at`` one adapter weight becomes NaN (a diverged update)."""

    def __init__(self, at):
        self.at, self.steps_ended = at, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.at:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_ended.append(state.global_step)


@pytest.mark.parametrize("grad_norm", ["available", "unavailable"])
def test_a_non_finite_step_stops_the_run_before_its_checkpoint(
    grad_norm, monkeypatch, tiny_llama_dir, tiny_data_dir, tmp_path
):
    if grad_norm == "unavailable":  # as under DeepSpeed with compute_grad_norm: false; the step losses decide
        from transformers import Trainer

        monkeypatch.setattr(Trainer, "_get_grad_norm", lambda self, model, grad_norm=None: None)
    plant = PlantNaN(at=3)
    args = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        tmp_path,
        max_steps=5,
        save_strategy="steps",
        save_steps=1,
        macdrop_curriculum="constant",
        macdrop_p0=0.5,
    )
    with pytest.raises(RuntimeError) as info:
        run_in_process(args, [plant])
    message = str(info.value)
    assert type(info.value).__name__ == "NonFiniteTrainingError"
    assert "\n" not in message
    assert "non-finite at optimizer step 3" in message
    assert "macdrop_p=0.5" in message
    assert ("grad_norm=nan" if grad_norm == "available" else "training loss is nan/inf") in message
    assert message.endswith(
        f"the last checkpoint, {tmp_path / 'checkpoint-2'}, was saved at step 2, before the first non-finite step"
    )
    assert plant.steps_ended == [1, 2, 3]  # stopped right after step 3 ...
    assert (tmp_path / "checkpoint-2").is_dir()
    assert not (tmp_path / "checkpoint-3").exists()  # ... before saving it


def test_fp16_loss_scaler_skips_are_exempt_unless_the_loss_is_non_finite(
    monkeypatch, tiny_llama_dir, tiny_data_dir, tmp_path
):
    """No fp16 training on a CPU: the loss scaler's verdict is simulated. Step 2 has an inf grad norm
    and is reported skipped by the scaler (finite loss): the run goes on. Step 3 is skipped too but
    its loss is NaN (planted): that is divergence, not an overflow of the scaled loss."""
    from accelerate import Accelerator
    from transformers import Trainer

    current = {}
    original_norm = Trainer._get_grad_norm

    def grad_norm(self, model, grad_norm=None):
        current["step"] = self.state.global_step + 1
        value = original_norm(self, model, grad_norm)
        return float("inf") if current["step"] == 2 else value

    monkeypatch.setattr(Trainer, "_get_grad_norm", grad_norm)
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: current.get("step") in (2, 3)))

    class FP16(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            args.fp16 = (
                True  # what the exemption reads; on a CPU accelerate builds no loss scaler, so its skips are simulated
            )

    plant = PlantNaN(at=3)
    args = tiny.lf_train_args(
        tiny_llama_dir, tiny_data_dir, tmp_path, max_steps=5, macdrop_curriculum="constant", macdrop_p0=0.5
    )
    with pytest.raises(RuntimeError, match="non-finite at optimizer step 3 .the training loss is nan/inf") as info:
        run_in_process(args, [FP16(), plant])
    assert str(info.value).endswith(f"{tmp_path} holds no checkpoint from before this step")  # save_strategy: no
    assert plant.steps_ended == [1, 2, 3]  # step 2 (inf grad norm, skipped by the scaler) passed


def test_epoch_curriculum_within_one_epoch_is_refused_before_the_first_step(tiny_llama_dir, tiny_data_dir, tmp_path):
    """max_steps=2 lies inside the first epoch (4 steps per epoch): epoch_after would be p = 0 throughout."""
    from llamafactory_macdrop.plugin.keys import MacDropConfigError

    seen = SeenMasks()
    args = tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, tmp_path, max_steps=2, macdrop_curriculum="epoch_after")
    with pytest.raises(MacDropConfigError) as info:
        run_in_process(args, [seen])
    message = str(info.value)
    assert "macdrop_curriculum='epoch_after'" in message
    assert "p = 0 throughout" in message
    assert "use macdrop_curriculum: step, exp or constant" in message
    assert "\n" not in message
    assert seen.by_step == {}
    assert seen.steps_ended == 0  # no forward, no step


def test_macdrop_off_warns_about_its_ignored_keys(tiny_llama_dir, tiny_data_dir, tmp_path):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("llamafactory_macdrop")
    logger.addHandler(handler)
    try:
        args = tiny.lf_train_args(
            tmp_path / "no-such-model", tiny_data_dir, tmp_path, macdrop=False, macdrop_k=3, macdrop_p0=0.5
        )
        lf_only, config = integration.validate_args(args)
        assert config is None
        with pytest.raises(Exception):  # LF's own loader fails on the missing model, after the warning
            run_in_process(args)
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert lines == [
        "MacDrop is off (no macdrop: true), so these keys are ignored (not checked): macdrop_k, macdrop_p0"
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, overrides, fragment",
    [
        (
            "mid-run",
            dict(max_steps=4, learning_rate=1e30, save_strategy="steps", save_steps=1),
            "non-finite at optimizer step 2 (grad_norm=nan, macdrop_p=0.4)",
        ),
    ],
)
def test_torchrun_children_report_a_plugin_error_in_one_line(
    case, overrides, fragment, tiny_llama_dir, tiny_data_dir, tmp_path
):
    """FORCE_TORCHRUN=1 NPROC_PER_NODE=2 llamafactory-cli train: an error raised in both children
    reads as in one process: one line, exit 2 (mid-run: lr 1e30 makes step 2 non-finite, and both
    ranks must stop together on the global grad norm). Set-up errors take the same path."""
    cfg = tiny.lf_train_args(
        tiny_llama_dir, tiny_data_dir, tmp_path / "out", per_device_train_batch_size=1, **overrides
    )
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "DS_ACCELERATOR": "cpu",
        "FORCE_TORCHRUN": "1",
        "NPROC_PER_NODE": "2",
        "MASTER_PORT": str(29500 + (os.getpid() + len(case)) % 1000),
    }
    proc = subprocess.run(
        [str(BIN / "llamafactory-cli"), "train", str(tmp_path / "x.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in proc.stderr.splitlines() if "[macdrop] error:" in line]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert fragment in errors[0], proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "ChildFailedError" not in proc.stderr, proc.stderr[-4000:]
    if case == "mid-run":
        assert (tmp_path / "out" / "checkpoint-1").is_dir()
        assert not (tmp_path / "out" / "checkpoint-2").exists()


#: a test-only sitecustomize.py, first on the children's PYTHONPATH: on rank 1 the locator the
#: trainer module (integrations/transformers/trainer.py) calls at the first training step raises a plugin error that no other rank
#: raises; with RANK0_HANGS rank 0 then never returns from its next collective (the broadcast of
#: the locator result), as under NCCL, where a peer that has gone is not noticed
PLANT_RANK1_ERROR = """
import os, time
RANK0_HANGS = {rank0_hangs!r}
if os.environ.get("RANK") == "1":
    from llamafactory_macdrop.core.locator import LocatorError
    from llamafactory_macdrop.integrations.transformers import trainer

    def _planted(*args, **kwargs):
        raise LocatorError("planted: rank 1 only")

    trainer.locate_massive_weights = _planted
elif os.environ.get("RANK") == "0" and RANK0_HANGS:
    from llamafactory_macdrop.integrations.transformers import trainer

    def _waits_for_ever(result):
        while True:
            time.sleep(60)

    trainer._broadcast_result = _waits_for_ever
"""
PLANTED = "[macdrop] error: planted: rank 1 only"
#: the ranks end within seconds of rank 1's error; a run past this waited for rank 1 in a collective
QUICK_S = 120
#: when a run that should have ended is given up on (and its process tree killed)
GIVE_UP_S = 300


def _rank1_fails(tmp_path, rank0_hangs=False):
    """The environment of a 2-rank run whose rank 1 alone raises a plugin error at the first step."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PLANT_RANK1_ERROR.format(rank0_hangs=rank0_hangs))
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO), str(REPO / "tests")]),
        "DS_ACCELERATOR": "cpu",
    }


def _run_quickly(cmd, cwd, env, what):
    """(completed process, wall seconds); fails the test after GIVE_UP_S, ending the whole process tree
    first: torchrun starts each rank in a session of its own, and a rank left waiting would keep
    the output pipes open (and the test waiting) for good."""
    import psutil

    start = time.monotonic()
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            stdout, stderr = child.communicate(timeout=GIVE_UP_S)
        except subprocess.TimeoutExpired:
            tree = psutil.Process(child.pid).children(recursive=True)  # before the parents go
            for proc in [*tree, psutil.Process(child.pid)]:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            stdout, stderr = child.communicate()
            pytest.fail(
                f"{what}: still running after {GIVE_UP_S} s, the other rank waits in a collective for rank 1\n"
                f"{stderr[-3000:]}"
            )
    return subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr), time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("rank0, port", [("collective-fails", 11), ("collective-hangs", 12)])
def test_a_plugin_error_on_rank_1_alone_ends_every_rank_at_once(rank0, port, tiny_llama_dir, tiny_data_dir, tmp_path):
    """FORCE_TORCHRUN=1 NPROC_PER_NODE=2 llamafactory-cli train, rank 1 alone raises a plugin error:
    one line, exit 2, no traceback, long before any collective timeout. Rank 0's next collective
    either fails (gloo notices the closed connection: rank 0 must not add its own traceback) or
    never returns (as under NCCL: rank 0's watcher thread must end it). Before, only local rank
    0's message reached the launcher: nothing was printed, rank 0 failed with a gloo traceback
    and torchrun with ChildFailedError, or, with the hang, the run never ended."""
    env = _rank1_fails(tmp_path, rank0_hangs=rank0 == "collective-hangs")
    env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", MASTER_PORT=str(29500 + (os.getpid() + port) % 1000))
    cfg = tiny.lf_train_args(
        tiny_llama_dir, tiny_data_dir, tmp_path / "out", per_device_train_batch_size=1, max_steps=2
    )
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    proc, wall = _run_quickly(
        [str(BIN / "llamafactory-cli"), "train", str(tmp_path / "x.yaml")],
        tmp_path,
        env,
        f"llamafactory-cli train, rank 1 failing alone, rank 0's collective {rank0}",
    )
    errors = [line for line in proc.stderr.splitlines() if "[macdrop] error:" in line]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert errors == [PLANTED], proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "ChildFailedError" not in proc.stderr, proc.stderr[-4000:]
    assert wall < QUICK_S, f"{wall:.0f} s"


@pytest.mark.slow
def test_a_plugin_error_on_rank_1_alone_under_plain_torchrun(tiny_llama_dir, tiny_data_dir, tmp_path):
    """torchrun started by hand on LLaMA-Factory's entry point (no launcher, no error file): rank 1
    prints the one line and exits 2, torchrun stops rank 0 at once (before, rank 1 printed
    nothing: only global rank 0 printed). Rank 0 adds no traceback of its own; torchrun's
    report of the failed worker is its own, as for any failing worker."""
    import llamafactory.launcher

    env = _rank1_fails(tmp_path)
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")  # the job's claim file lands here, not in the machine's /tmp
    cfg = tiny.lf_train_args(
        tiny_llama_dir, tiny_data_dir, tmp_path / "out", per_device_train_batch_size=1, max_steps=2
    )
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + (os.getpid() + 13) % 1000),
        llamafactory.launcher.__file__,
        str(tmp_path / "x.yaml"),
    ]
    proc, wall = _run_quickly(cmd, tmp_path, env, "torchrun, rank 1 failing alone")
    errors = [line for line in proc.stderr.splitlines() if "[macdrop] error:" in line]
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert errors[0].endswith(PLANTED), proc.stderr[-4000:]
    assert "[rank0]: Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "Connection closed" not in proc.stderr, proc.stderr[-4000:]
    assert len(list((tmp_path / "tmp").glob("macdrop-error-*.claim"))) == 1  # one job, one claim
    assert wall < QUICK_S, f"{wall:.0f} s"


@pytest.mark.slow
def test_resume_on_ranks_without_a_shared_filesystem(tiny_llama_dir, tiny_data_dir, tmp_path):
    """Only rank 0 has macdrop_locator.json: it alone decides to reuse it, and rank 1 follows
    (before, rank 1 located afresh while rank 0 did not: the two met in different collectives)."""
    out = tmp_path / "out"
    base = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        out,
        max_steps=4,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=2,
        macdrop_curriculum="constant",
        macdrop_p0=0.5,
    )
    run_in_process(base)
    located = json.loads((out / "macdrop_locator.json").read_text())
    for name in ("optimizer.pt", "scheduler.pt"):  # CPU ranks cannot load them (map_location 'cpu:0'),
        (out / "checkpoint-2" / name).unlink()  # MacDrop or not; the test is about the locator file
    args = {**base, "overwrite_output_dir": False, "resume_from_checkpoint": str(out / "checkpoint-2")}
    (tmp_path / "args.json").write_text(json.dumps(args))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "DS_ACCELERATOR": "cpu",
    }
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + (os.getpid() + 3) % 1000),
        str(REPO / "tests" / "resume_no_shared_fs.py"),
        str(tmp_path / "args.json"),
    ]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the resumed 2-rank run hung (ranks disagreed about reusing macdrop_locator.json)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "reused from" in proc.stdout + proc.stderr
    assert json.loads((out / "macdrop_locator.json").read_text()) == located
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
