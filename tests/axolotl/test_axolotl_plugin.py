"""MacDrop as an axolotl plugin, through axolotl's own CLI and config loading (axolotl 0.19.0, CPU).

* ``axolotl train cfg.yml`` (accelerate launch -> ``axolotl.cli.train``) with
  ``plugins: [llamafactory_macdrop.integrations.axolotl.MacDropPlugin, spy_plugin.SpyPlugin]``:
  the spy (spy_plugin.py, tests/dist_check.py's Recorder) sees Algorithm 1's weight in every
  training forward for the masks ``dist_check`` predicts, the storage bytes restored after every
  step, ``macdrop_p`` in the log; and axolotl's own reader of the weights its fused LoRA kernels
  compute with (``get_lora_parameters``) returns ``base_layer.weight`` itself, masked the same way.
  The kernels themselves are Triton GPU code (their SwiGLU raises "Torch not compiled with CUDA
  enabled" on this CPU torch, with or without MacDrop), so this run turns them off.
* ``load_cfg`` (axolotl's config loading and validation): the ``macdrop_*`` keys in axolotl's
  merged schema, and what the plugin refuses before anything loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from dist_check import check_forward, expected_keep, step_p
from helpers import tiny

SEED, STEPS, GA, P0 = 7, 3, 2, 0.8
BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
PLUGIN = "llamafactory_macdrop.integrations.axolotl.MacDropPlugin"


def axolotl_config(model_dir, data_dir, out, **overrides) -> dict:
    cfg = dict(
        base_model=str(model_dir),
        datasets=[{"path": str(Path(data_dir) / "tiny_sft.json"), "ds_type": "json", "type": "alpaca"}],
        dataset_prepared_path=str(Path(out) / "prepared"),
        val_set_size=0,
        output_dir=str(Path(out) / "out"),
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        sequence_len=128,
        micro_batch_size=2,
        gradient_accumulation_steps=GA,
        max_steps=STEPS,
        num_epochs=1,
        learning_rate=1e-3,
        optimizer="adamw_torch",
        lr_scheduler="constant",
        logging_steps=1,
        save_strategy="no",
        seed=SEED,
        bf16=False,
        fp16=False,
        tf32=False,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # Triton kernels: GPU only (module docstring)
        lora_mlp_kernel=False,
        lora_qkv_kernel=False,
        lora_o_kernel=False,
        lora_embedding_kernel=False,
        plugins=[PLUGIN],
        macdrop=True,
        macdrop_p0=P0,
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def cli_run(tiny_llama_dir, tiny_data_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("axolotl")
    cfg = axolotl_config(tiny_llama_dir, tiny_data_dir, work, plugins=[PLUGIN, "spy_plugin.SpyPlugin"])
    (work / "cfg.yml").write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # axolotl execs `accelerate launch`
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),  # the spy plugin and the oracle only
        "MACDROP_SPY_TRACE": str(work / "trace.pt"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [str(BIN / "axolotl"), "train", str(work / "cfg.yml")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(work / "trace.pt", weights_only=False), work, proc


def test_axolotl_train_runs_algorithm_1(cli_run):
    """Every training forward computes with Algorithm 1's weight for its optimizer step's mask (axolotl
    decides how many micro-batches a step has: here 2, 1 and 2), the storage is bitwise restored after
    every step, the located rows are the planted ones, macdrop_p is logged."""
    trace, work, _ = cli_run
    located = yaml.safe_load((work / "out" / "macdrop_locator.json").read_text())
    assert (located["layer"], located["indices"]) == (tiny.PLANTED_LAYER, tiny.PLANTED_INDICES)
    rows = list(tiny.PLANTED_INDICES)
    original = trace["original"]
    shape = (len(rows), original["up"].shape[1])
    forwards = trace["forward"]
    assert sorted({step for step, _ in forwards}) == list(range(1, STEPS + 1))
    for i, (step, weights) in enumerate(forwards):
        keep = expected_keep(SEED, step, 0, step_p(P0, step, STEPS), shape)
        try:
            check_forward(weights, original, rows, keep)
        except AssertionError as err:
            raise AssertionError(f"forward {i} (optimizer step {step}): {err}") from None
    dropped = sum(int((~expected_keep(SEED, t, 0, step_p(P0, t, STEPS), shape)).sum()) for t in range(1, STEPS))
    assert dropped > 0
    assert [s for s, _ in trace["bytes_after"]] == list(range(1, STEPS + 1))
    for step, after in trace["bytes_after"]:
        for key, before in trace["bytes_before"].items():
            assert torch.equal(after[key], before), f"{key} not restored after step {step}"
    logged = [h["macdrop_p"] for h in trace["log_history"] if "loss" in h]
    assert logged == pytest.approx([step_p(P0, t, STEPS) for t in range(1, STEPS + 1)])


def test_the_weight_axolotls_lora_kernels_read_is_the_masked_one(cli_run):
    """``get_lora_parameters(proj)[0]``, what axolotl's fused LoRA MLP kernel multiplies with, is the
    ``base_layer.weight`` MacDrop edits in place, with the same dropped elements the layer's own
    forward computes with (the recompute in backward included)."""
    trace, _, _ = cli_run
    reads, forwards = trace["kernel_reads"], trace["forward"]
    assert len(reads) == len(forwards) > 0  # forwards and gradient-checkpoint recomputes
    masked = 0
    for (step_read, read), (step_seen, seen) in zip(reads, forwards):
        assert step_read == step_seen
        assert read["up_is_base_layer_weight"] and read["gate_is_base_layer_weight"]
        for key in ("up", "gate"):
            assert torch.equal(read[key], seen[key]), (step_read, key)
        masked += bool((read["up"] != trace["original"]["up"]).any())
    assert masked == sum(step < STEPS for step, _ in forwards)  # the step curriculum's last step has p = 0


def test_the_run_says_macdrop_is_on(cli_run):
    _, work, proc = cli_run
    assert (
        "Plugin loaded successfully: llamafactory_macdrop.integrations.axolotl.MacDropPlugin"
        in proc.stdout + proc.stderr
    )
    assert (work / "out" / "macdrop_locator.json").is_file()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(macdrop_p0=1.5), "macdrop_p0=1.5 is not allowed: expected a float in [0, 1]"),
        (dict(macdrop_curriculum="linear"), "macdrop_curriculum"),
        (dict(macdrop_k=129), "macdrop_k=129 is out of range: {model}/config.json has intermediate_size 128"),
        (dict(macdrop_layer=5), "macdrop_layer=5 is out of range: {model}/config.json has 2 layers (0..1)"),
        (dict(adapter=None), "macdrop=true with adapter=None is not supported here: the axolotl plugin is tested"),
        (dict(rl="kto"), "macdrop=true with rl=kto is not supported"),
        (dict(load_in_8bit=True), "macdrop=true with load_in_8bit=true is not supported"),
        (dict(peft_use_dora=True, macdrop_p0=1.0), "macdrop_p0=1.0 with use_dora=true is not supported"),
    ],
    ids=["p0", "curriculum", "k", "layer", "no_adapter", "kto", "8bit", "dora"],
)
def test_axolotl_config_loading_refuses(overrides, needle, tiny_llama_dir, tiny_data_dir, tmp_path):
    from axolotl.cli.config import load_cfg

    cfg = axolotl_config(tiny_llama_dir, tiny_data_dir, tmp_path, **overrides)
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(Exception) as info:
        load_cfg(str(tmp_path / "cfg.yml"))
    assert needle.format(model=tiny_llama_dir) in str(info.value)


def test_macdrop_off_or_absent_loads_untouched(tiny_llama_dir, tiny_data_dir, tmp_path):
    from axolotl.cli.config import load_cfg

    cfg = axolotl_config(tiny_llama_dir, tiny_data_dir, tmp_path, macdrop=False, macdrop_k=100000)
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    loaded = load_cfg(str(tmp_path / "cfg.yml"))
    assert loaded.macdrop is False


def test_the_schema_is_the_keys():
    """axolotl's view of the keys (args.py) has MacDropConfig's names, defaults and help texts."""
    from llamafactory_macdrop.integrations.axolotl.args import MacDropArgs
    from llamafactory_macdrop.plugin.keys import MacDropConfig

    reference = {name: (default, help_text) for name, _kind, default, help_text in MacDropConfig.key_reference()}
    fields = MacDropArgs.model_fields
    assert list(fields) == list(reference)
    for name, field in fields.items():
        assert (field.default, field.description) == reference[name], name


def test_the_docs_example_loads(tiny_llama_dir, tiny_data_dir, tmp_path):
    """examples/hosts/axolotl.yml (docs/hosts.md) through axolotl's config loading, its model and data
    swapped for the planted ones (SmolLM2 is in models/ only after `make demo`)."""
    from axolotl.cli.config import load_cfg

    cfg = yaml.safe_load((HERE.parents[1] / "examples" / "hosts" / "axolotl.yml").read_text())
    cfg.update(
        base_model=str(tiny_llama_dir),
        datasets=[{"path": str(tiny_data_dir / "tiny_sft.json"), "ds_type": "json", "type": "alpaca"}],
        dataset_prepared_path=str(tmp_path / "prepared"),
        output_dir=str(tmp_path / "out"),
    )
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    loaded = load_cfg(str(tmp_path / "cfg.yml"))
    assert loaded.plugins == [PLUGIN]
    assert (loaded.macdrop, loaded.macdrop_k, loaded.macdrop_p0, loaded.macdrop_curriculum) == (True, 5, 0.8, "step")
