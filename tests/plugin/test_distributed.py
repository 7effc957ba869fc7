"""Data-parallel MacDrop on CPU: torchrun DDP (gloo), DeepSpeed ZeRO-2/ZeRO-3 and FSDP1/FSDP2, 2 ranks each.

Every run trains the planted tiny Llama for 4 optimizer steps (pt stage: packed 32-token blocks,
so every micro-batch has the same number of tokens and the global-batch loss of 2 ranks x 1 row
equals the single-process loss of 1 x 2 rows). Asserted per run, from tests/dist_check.py's
per-rank traces:

* every rank located the planted layer and indices;
* every forward of W_up (gradient-checkpoint recomputation included) saw exactly
  ``original * M`` on the located rows, with M the mask Algorithm 1 draws for that optimizer
  step and micro-batch (recomputed here from the seed), the same M on every rank; under ZeRO-3
  and FSDP that is the GATHERED weight, assembled from each rank's partition/shard edits;
* after every optimizer step, and at the end, the weights are bitwise what they were before;
* QLoRA (4-bit, bitsandbytes on CPU): the dequantized rows the layer computes with are exactly
  ``dequant(W) * M`` (masking edits the 4-bit codes, see storage.Packed4bitRows);
* loss, grad norm and macdrop_p per step equal the single-process run's;
* ZeRO-3 with DoRA (a shipped recipe): the same, against a single-process DoRA run;
* DPO under FSDP1/FSDP2: the reference forward (adapter off) sees the original rows between the
  masked forward and the masked recomputation.

FSDP runs take their settings from the shipped accelerate configs (yaml_configs/fsdp_config.yaml,
fsdp2_config.yaml), passed as the FSDP_* variables ``accelerate launch`` would set, under
torchrun: ``accelerate launch`` itself refuses FSDP on a CPU-only machine ("There are currently
no available devices found"), and accelerate's state stays MULTI_CPU (plain DDP) on CPU ranks,
which dist_check.allow_fsdp_on_cpu lifts for these tests. CPU-only deviations from the configs
(CPU_ONLY below), all the same without MacDrop: the final save uses SHARDED_STATE_DICT
(FULL_STATE_DICT fails on CPU in peft's save_pretrained: "Attempted to access the data pointer on
an invalid python storage"); sync_module_states and cpu_ram_efficient_loading are off (accelerate
needs an accelerator device for them); and FSDP1 runs without gradient clipping, compared with an
unclipped single-process run, because FSDP1's clip_grad_norm_ reports a different norm on these
CPU ranks (12.25 single vs 9.52 FSDP1 at step 1 without MacDrop; the losses then drift apart
through the clipping factor, while unclipped they agree to every printed digit).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from dist_check import verify
from helpers import tiny
from helpers.process import BIN, REPO
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
SCRIPT = REPO / "tests" / "dist_check.py"
STEPS, GA = 4, 2
deepspeed = pytest.importorskip("deepspeed")


#: FSDP mode -> (shipped accelerate config, settings changed from it)
FSDP_MODES = {
    "fsdp1": ("fsdp_config.yaml", {}),  # use_orig_params: true, as LLaMA-Factory's example
    "fsdp1_flat": ("fsdp_config.yaml", {"fsdp_use_orig_params": False}),
    # what FSDP1 makes of FULL_SHARD on one rank (one GPU): the FlatParameter is not split
    "fsdp1_noshard": ("fsdp_config.yaml", {"fsdp_sharding_strategy": "NO_SHARD"}),
    "fsdp2": ("fsdp2_config.yaml", {}),
}
SINGLE_PROCESS = ("single", "single_unclipped", "single_dora", "qlora")


#: accelerate/FSDP settings a CPU-only machine cannot use (module docstring); tests/gpu/check_gpu.py
#: runs the shipped configs unchanged
CPU_ONLY = {
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_sync_module_states": False,  # accelerate: "There are currently no available devices found"
    "fsdp_cpu_ram_efficient_loading": False,  # needs sync_module_states
}


def _unclipped(mode):
    return mode in ("single_unclipped", "fsdp1", "fsdp1_flat")  # FSDP1 split across ranks: docstring


def fsdp_env(config_name: str, **overrides) -> dict:
    """The environment ``accelerate launch --config_file yaml_configs/<config_name>`` gives each rank."""
    config = yaml.safe_load((REPO / "yaml_configs" / config_name).read_text())
    assert config["distributed_type"] == "FSDP"
    settings = {**config["fsdp_config"], **overrides, **CPU_ONLY}
    env = {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "no"}
    for key, value in settings.items():
        name = "FSDP_TRANSFORMER_CLS_TO_WRAP" if key == "fsdp_transformer_layer_cls_to_wrap" else key.upper()
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _args(model_dir, data_dir, out, mode, stage="pt"):
    """LLaMA-Factory arguments; ``mode`` adds DeepSpeed (zero2/zero3) or 4-bit QLoRA (qlora)."""
    data = {"pt": dict(dataset="tiny_pt", cutoff_len=32), "dpo": dict(dataset="tiny_dpo", cutoff_len=48)}[stage]
    args = tiny.lf_train_args(
        model_dir,
        data_dir,
        out,
        stage=stage,
        **data,
        max_steps=STEPS,
        per_device_train_batch_size=1
        if mode in ("ddp", "zero2", "zero3", "zero3_dora", "moe_zero3") or mode in FSDP_MODES
        else 2,
        gradient_accumulation_steps=GA,
        seed=7,
    )
    if mode.startswith(("zero2", "zero3", "moe_zero3")):
        args["deepspeed"] = str(REPO / "yaml_configs" / f"ds_z{mode.split('zero')[1][0]}_config.json")
    if mode.endswith("_dora"):  # a shipped recipe combination (llama3_8b_dora_macdrop_ds_z3.yaml)
        args["use_dora"] = True
    if mode == "qlora":
        args["quantization_bit"] = 4
    if _unclipped(mode):
        args["max_grad_norm"] = 0.0
    return args


def _run(tmp_path, model_dir, data_dir, mode, stage="pt", oracle=None):
    work = tmp_path / mode
    work.mkdir()
    args = _args(model_dir, data_dir, work / "out", mode, stage)
    (work / "args.json").write_text(json.dumps(args))
    extra = []
    if oracle is not None:  # where the planted massive weights of this model are (default: tests/helpers/tiny.py's)
        (work / "oracle.json").write_text(json.dumps(oracle))
        extra = [str(work / "oracle.json")]
    cmd = (
        [sys.executable, str(SCRIPT)]
        if mode in SINGLE_PROCESS
        else [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            str(SCRIPT),
        ]
    )
    # the repository first: a worktree must test its own package, not an editable install elsewhere
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "DS_ACCELERATOR": "cpu",
        "PYTHONFAULTHANDLER": "1",
    }  # a rank that aborts prints where
    if mode in FSDP_MODES:
        config_name, overrides = FSDP_MODES[mode]
        env.update(fsdp_env(config_name, **overrides))
    proc = subprocess.run(
        cmd + [str(work / "args.json"), str(work / "trace"), *extra],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        (work / "stderr.txt").write_text(proc.stderr)
        # a torchrun child's own error is buried under the other rank's output: lift it out
        causes = [
            line
            for line in proc.stderr.splitlines()
            if re.search(r"Error|error:|terminate|Abort|abort|Traceback|what\(\)", line)
        ]
        pytest.fail(
            f"{mode} exited {proc.returncode}\n"
            + "\n".join(causes[-40:])
            + "\n--- stdout tail\n"
            + proc.stdout[-2000:]
            + "\n--- stderr tail\n"
            + proc.stderr[-4000:]
        )
    ranks = 1 if mode in SINGLE_PROCESS else 2
    traces = [torch.load(work / "trace" / f"rank{r}.pt") for r in range(ranks)]
    located = json.loads((work / "out" / "macdrop_locator.json").read_text())  # written by rank 0
    for trace in traces:
        trace["located"] = located
    state = json.loads((work / "out" / "trainer_state.json").read_text())
    return traces, [h for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def single(tiny_llama_dir, tiny_data_dir, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("dist"), tiny_llama_dir, tiny_data_dir, "single")


@pytest.fixture(scope="module")
def single_unclipped(tiny_llama_dir, tiny_data_dir, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("dist"), tiny_llama_dir, tiny_data_dir, "single_unclipped")


@pytest.fixture(scope="module")
def single_dora(tiny_llama_dir, tiny_data_dir, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("dist"), tiny_llama_dir, tiny_data_dir, "single_dora")


@pytest.mark.parametrize("mode", ["single", "ddp", "zero2", "zero3", "zero3_dora", "qlora", *FSDP_MODES])
def test_data_parallel_is_algorithm1_on_the_global_batch(
    mode, single, tiny_llama_dir, tiny_data_dir, tmp_path, request
):
    if mode.startswith("zero") and not shutil.which("g++"):
        pytest.skip("DeepSpeed's CPU ops need g++")
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    traces, log = single if mode == "single" else _run(tmp_path, tiny_llama_dir, tiny_data_dir, mode)
    if _unclipped(mode):
        single = request.getfixturevalue("single_unclipped")
    if mode.endswith("_dora"):  # DoRA reads the (gathered, masked) base weight for its row norm too
        single = request.getfixturevalue("single_dora")
    weights = load_file(tiny_llama_dir / "model.safetensors")
    up_name = f"model.layers.{tiny.PLANTED_LAYER}.mlp.up_proj.weight"
    # QLoRA computes with the dequantized 4-bit weight (measured before the first step), the rest
    # with the checkpoint's
    original = None if mode == "qlora" else {"up": weights[up_name], "gate": weights[up_name.replace("up_", "gate_")]}
    engine = {
        "zero2": "DeepSpeedEngine",
        "zero3": "DeepSpeedEngine",
        "zero3_dora": "DeepSpeedEngine",
        "fsdp1": "FullyShardedDataParallel",
        "fsdp1_flat": "FullyShardedDataParallel",
        "fsdp1_noshard": "FullyShardedDataParallel",
    }
    for trace in traces:
        assert trace["engine"] == engine.get(mode, trace["engine"]), trace["engine"]
        if mode == "fsdp2":
            assert trace["storage"]["up"]["type"] == "DTensor", trace["storage"]
        if mode == "qlora":  # LLaMA-Factory stores the 4-bit codes in a float tensor (quant_storage = compute dtype)
            assert trace["storage"]["up"]["quantized"], trace["storage"]
            assert trace["storage"]["up"]["dtype"] != "torch.uint8", trace["storage"]
    verify(
        traces,
        layer=tiny.PLANTED_LAYER,
        indices=tiny.PLANTED_INDICES,
        seed=7,
        steps=STEPS,
        ga=GA,
        zero3=mode.startswith("zero3"),
        original=original,
    )

    if mode == "qlora":  # a different model (4-bit base): only p must match
        assert [h["macdrop_p"] for h in log] == [h["macdrop_p"] for h in single[1]]
        return
    single_log = single[1]
    assert [h["macdrop_p"] for h in log] == [h["macdrop_p"] for h in single_log]
    assert [h["loss"] for h in log] == pytest.approx([h["loss"] for h in single_log], abs=2e-3)
    if mode in ("fsdp1", "fsdp1_flat"):  # FSDP1's reported norm differs on CPU ranks, with or without MacDrop
        return
    assert [h["grad_norm"] for h in log] == pytest.approx([h["grad_norm"] for h in single_log], rel=1e-2)


@pytest.mark.parametrize("mode", ["fsdp1", "fsdp2"])
def test_dpo_reference_forward_sees_original_rows_under_fsdp(mode, tiny_llama_dir, tiny_data_dir, tmp_path):
    """DPO's reference forward (same model, adapter off) runs between the masked forward and the
    masked recomputation: MacDrop restores the shards for it and re-applies the same M after."""
    traces, log = _run(tmp_path, tiny_llama_dir, tiny_data_dir, mode, stage="dpo")
    verify(traces, layer=tiny.PLANTED_LAYER, indices=tiny.PLANTED_INDICES, seed=7, steps=STEPS, ga=GA, reference=True)
    assert [h["macdrop_p"] for h in log] == pytest.approx([0.6, 0.4, 0.2, 0.0])


def test_moe_under_zero3_locates_the_routed_expert_and_masks_only_its_rows(tiny_data_dir, tmp_path):
    """Mixtral-style fused experts under ZeRO-3 (2 ranks): every parameter is a 1-D partition
    outside its module's forward, so the layout is recognised from ``ds_shape`` and the router and
    expert weights are read inside their own modules' forward, where ZeRO-3 has gathered them."""
    from helpers import tiny_archs as ta

    model_dir = ta.save_with_tokenizer("mixtral", tmp_path / "mixtral")
    oracle = {"layer": ta.PLANTED_LAYER, "indices": ta.PLANTED_INDICES, "expert": ta.PLANTED_EXPERT}
    traces, log = _run(tmp_path, model_dir, tiny_data_dir, "moe_zero3", oracle=oracle)
    assert traces[0]["located"]["expert"] == ta.PLANTED_EXPERT
    for trace in traces:
        assert trace["engine"] == "DeepSpeedEngine"
        assert trace["storage"]["experts"]["zero3_partitioned"]
    verify(traces, layer=ta.PLANTED_LAYER, indices=ta.PLANTED_INDICES, seed=7, steps=STEPS, ga=GA, zero3=True)
    assert [h["macdrop_p"] for h in log] == pytest.approx([0.6, 0.4, 0.2, 0.0])
