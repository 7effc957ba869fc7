"""LLaMA-Factory's own run_exp, in this process, with MacDrop on: what the weights go through.

A watcher callback hooks the massive layer and records, at every forward pass, what the frozen
rows looked like; at every step end and at the end it checks the base weights bit for bit
against the checkpoint on disk.
"""

import json

import pytest
import torch
from helpers import tiny
from safetensors.torch import load_file
from transformers import TrainerCallback

from llamafactory_macdrop.core.storage import bits
from llamafactory_macdrop.plugin import integration
from llamafactory_macdrop.plugin.keys import MacDropConfigError

K = len(tiny.PLANTED_INDICES)


lf_args = tiny.lf_train_args


class Watcher(TrainerCallback):
    def __init__(self, originals, layer=tiny.PLANTED_LAYER, idx=tiny.PLANTED_INDICES):
        self.originals, self.layer, self.idx = originals, layer, torch.tensor(idx)
        self.calls, self.step_end_clean = [], []
        self.final_clean = None

    def base_weights(self):
        base = self.model.get_base_model()
        for i, layer in enumerate(base.model.layers):
            for kind in ("gate_proj", "up_proj", "down_proj"):
                yield f"model.layers.{i}.mlp.{kind}.weight", getattr(layer.mlp, kind).base_layer.weight

    def all_clean(self):
        return all(torch.equal(bits(w), bits(self.originals[n])) for n, w in self.base_weights())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model, self.state = model, state
        mlp = model.get_base_model().model.layers[self.layer].mlp
        self.gate, self.up = mlp.gate_proj.base_layer.weight, mlp.up_proj.base_layer.weight
        mlp.up_proj.register_forward_pre_hook(self.seen)

    def seen(self, module, args):
        name = f"model.layers.{self.layer}.mlp"
        up0, gate0 = self.originals[f"{name}.up_proj.weight"], self.originals[f"{name}.gate_proj.weight"]
        zeros_up = (self.up[self.idx] == 0) & (up0[self.idx] != 0)
        zeros_gate = (self.gate[self.idx] == 0) & (gate0[self.idx] != 0)
        others = torch.ones(self.up.shape[0], dtype=torch.bool)
        others[self.idx] = False
        self.calls.append(
            dict(
                training=self.model.training,
                reference=bool(getattr(module, "disable_adapters", False)),
                step=self.state.global_step + 1,
                zeros_up=zeros_up,
                zeros_gate=zeros_gate,
                rows_original=torch.equal(bits(self.up[self.idx]), bits(up0[self.idx]))
                and torch.equal(bits(self.gate[self.idx]), bits(gate0[self.idx])),
                others_original=torch.equal(bits(self.up[others]), bits(up0[others]))
                and torch.equal(bits(self.gate[others]), bits(gate0[others])),
            )
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end_clean.append(self.all_clean())

    def on_train_end(self, args, state, control, **kwargs):
        self.final_clean = self.all_clean()


def run_in_process(args, callbacks):
    integration.activate()
    from llamafactory.train.tuner import run_exp

    run_exp(args, callbacks=callbacks)


@pytest.mark.parametrize(
    "stage, dataset, dora",
    [("sft", "tiny_sft", False), ("sft", "tiny_sft", True), ("pt", "tiny_pt", False)],
    ids=["sft-lora", "sft-dora", "pt-lora"],
)
def test_masks_only_during_training_steps_and_restores_bitwise(
    tiny_llama_dir, tiny_data_dir, tmp_path, stage, dataset, dora
):
    originals = load_file(tiny_llama_dir / "model.safetensors")
    watcher = Watcher(originals)
    args = lf_args(
        tiny_llama_dir,
        tiny_data_dir,
        tmp_path,
        stage=stage,
        dataset=dataset,
        use_dora=dora,
        val_size=0.125,
        eval_strategy="steps",
        eval_steps=3,
        per_device_eval_batch_size=4,
    )
    run_in_process(args, [watcher])

    state = json.loads((tmp_path / "trainer_state.json").read_text())
    total = state["max_steps"]
    assert total >= 4
    logged = {h["step"]: h["macdrop_p"] for h in state["log_history"] if "macdrop_p" in h}
    assert logged == pytest.approx({t: 0.8 * (1 - t / total) for t in range(1, total + 1)})
    assert not any("macdrop_p" in h for h in state["log_history"] if "eval_loss" in h)

    train_calls = [c for c in watcher.calls if c["training"]]
    eval_calls = [c for c in watcher.calls if not c["training"]]
    assert train_calls
    assert eval_calls
    assert all(c["others_original"] for c in watcher.calls)
    assert all(c["rows_original"] for c in eval_calls)  # evaluation never sees masked weights
    for c in train_calls:
        p = 0.8 * (1 - c["step"] / total)
        assert torch.equal(c["zeros_up"], c["zeros_gate"])  # ONE mask for W_up and W_gate
        assert abs(c["zeros_up"].float().mean().item() - p) < 0.15, (c["step"], p)
    assert train_calls[-1]["step"] == total
    assert train_calls[-1]["rows_original"]  # p = 0 at the last step
    assert watcher.step_end_clean == [True] * total
    assert watcher.final_clean

    located = json.loads((tmp_path / "macdrop_locator.json").read_text())
    assert (located["layer"], located["indices"]) == (tiny.PLANTED_LAYER, tiny.PLANTED_INDICES)


def test_dpo_reference_forward_sees_the_original_rows(tiny_llama_dir, tiny_data_dir, tmp_path):
    originals = load_file(tiny_llama_dir / "model.safetensors")
    watcher = Watcher(originals)
    args = lf_args(
        tiny_llama_dir,
        tiny_data_dir,
        tmp_path,
        stage="dpo",
        dataset="tiny_dpo",
        num_train_epochs=1,
        macdrop_curriculum="constant",
        macdrop_p0=0.5,
    )
    run_in_process(args, [watcher])
    policy = [c for c in watcher.calls if c["training"] and not c["reference"]]
    reference = [c for c in watcher.calls if c["reference"]]
    assert policy
    assert reference
    assert all(c["rows_original"] for c in reference)
    assert all(not c["rows_original"] and torch.equal(c["zeros_up"], c["zeros_gate"]) for c in policy)
    assert watcher.final_clean


def test_macdrop_off_changes_nothing(tiny_llama_dir, tiny_data_dir, tmp_path):
    args = lf_args(tiny_llama_dir, tiny_data_dir, tmp_path, macdrop=False, macdrop_k=3, num_train_epochs=1)
    lf_only, config = integration.validate_args(args)
    assert config is None
    assert not any(k.startswith("macdrop") for k in lf_only)
    no_keys = {k: v for k, v in args.items() if not k.startswith("macdrop")}
    assert integration.validate_args(no_keys) == (no_keys, None)
    run_in_process(args, [])
    assert not (tmp_path / "macdrop_locator.json").exists()
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert not any("macdrop_p" in h for h in state["log_history"])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(stage="rm"), "stage='rm' is not supported"),
        (dict(stage="kto"), "stage='kto' is not supported"),
        (dict(stage="ppo", reward_model="some/reward-model"), "stage='ppo' is not supported"),  # LF needs the RM
        (dict(fsdp="shard_grad_op auto_wrap"), "FSDP1 fsdp_sharding_strategy=SHARD_GRAD_OP .* use FULL_SHARD"),
        (dict(fsdp="full_shard offload auto_wrap"), "FSDP CPU offload"),
        (
            dict(fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": 2, "reshard_after_forward": False}),
            "FSDP2 fsdp_reshard_after_forward=false",
        ),
        (dict(fsdp="full_shard auto_wrap", quantization_bit=4), "FSDP and quantization_bit=4"),
        (dict(finetuning_type="oft"), "finetuning_type='oft' is not supported: use lora, full, freeze"),
        (
            dict(finetuning_type="full", deepspeed={"zero_optimization": {"stage": 2}}),
            "DeepSpeed is not supported when the masked rows are trained \\(finetuning_type=full\\)",
        ),
        (dict(use_dora=True, macdrop_p0=1.0, macdrop_curriculum="constant"), "macdrop_p0=1.0 with use_dora=true"),
        (dict(use_dora=True, macdrop_p0=1.0, macdrop_curriculum="step"), "macdrop_p0=1.0 with use_dora=true"),
        (dict(use_dora=True, macdrop_p0=1.0, macdrop_curriculum="exp"), "macdrop_p0=1.0 with use_dora=true"),
        (dict(use_dora=True, macdrop_p0=1.0, macdrop_curriculum="epoch_after"), "macdrop_p0=1.0 with use_dora=true"),
        (
            dict(macdrop_curriculum="epoch_after", num_train_epochs=1),
            "macdrop_curriculum='epoch_after'.*p = 0 throughout",
        ),
        (
            dict(macdrop_curriculum="epoch_before", num_train_epochs=0.5),
            "macdrop_curriculum='epoch_before'.*p = macdrop_p0 throughout.*use macdrop_curriculum: step, exp or constant",
        ),
        (dict(macdrop_curriculum="epoch_after", streaming=True, max_steps=4), "no epoch count"),
        (dict(pissa_init=True), "pissa_init=true is not supported"),
        (
            dict(deepspeed={"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}),
            "zero_hpz_partition_size=8",
        ),
        (dict(deepspeed={"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}), "zero_quantized_weights"),
        (
            dict(deepspeed={"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}),
            "offload_param.device=nvme",
        ),
        (dict(macdrop_mask_per="per_step"), "macdrop_mask_per='per_step'"),
        (dict(macdrop_kk=3), "did you mean 'macdrop_k'"),
    ],
)
def test_unsupported_combinations_are_refused_before_loading(tiny_data_dir, tmp_path, overrides, fragment):
    args = lf_args(tmp_path / "no-such-model", tiny_data_dir, tmp_path, **overrides)
    with pytest.raises(MacDropConfigError, match=fragment):
        run_in_process(args, [])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(macdrop_layer=2), r"macdrop_layer=2 is out of range: .*config.json has 2 layers \(0..1\)"),
        (dict(macdrop_indices=[5, 128]), r"macdrop_indices=\[5, 128\]: \[128\] outside 0..127 \(intermediate size 128"),
        (dict(macdrop_layer=0, macdrop_indices=[200]), r"\[200\] outside 0..127"),
    ],
)
def test_layer_and_indices_are_checked_against_config_json_before_loading(tiny_data_dir, tmp_path, overrides, fragment):
    """Only config.json is there: a run that got past the check would fail in LF's loader instead."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 2, "intermediate_size": 128, "hidden_size": 64})
    )
    args = lf_args(folder, tiny_data_dir, tmp_path / "out", **overrides)
    with pytest.raises(MacDropConfigError, match=fragment):
        run_in_process(args, [])


def test_hub_id_already_in_the_cache_is_checked_before_loading(tiny_data_dir, tmp_path):
    """A hub id whose config.json sits in the Hugging Face cache (here a cache_dir laid out as the
    hub client lays it out) is checked like a local folder, with no download."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "models--someorg--tiny" / "refs").mkdir()
    (cache / "models--someorg--tiny" / "refs" / "main").write_text("0123abcd")
    (snapshot / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "intermediate_size": 128,
                "hidden_size": 64,
                "quantization_config": {"quant_method": "gptq", "bits": 4},
            }
        )
    )
    args = lf_args("someorg/tiny", tiny_data_dir, tmp_path / "out", cache_dir=str(cache))
    with pytest.raises(MacDropConfigError, match=r"someorg/tiny, a checkpoint quantized with quant_method=gptq"):
        run_in_process(args, [])
    (snapshot / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 2, "intermediate_size": 128, "hidden_size": 64})
    )
    args = lf_args("someorg/tiny", tiny_data_dir, tmp_path / "out", cache_dir=str(cache), macdrop_layer=5)
    with pytest.raises(MacDropConfigError, match=r"macdrop_layer=5 is out of range: .*config.json has 2 layers"):
        run_in_process(args, [])


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}, None),
        ({"FSDP_VERSION": "1"}, None),  # accelerate's default strategy: FULL_SHARD
        ({"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, None),
        ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}, None),
        ({"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "2"}, "fsdp_sharding_strategy=SHARD_GRAD_OP"),
        ({"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "fsdp_sharding_strategy=HYBRID_SHARD"),
        ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, "fsdp_reshard_after_forward=false"),
        ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "FSDP CPU offload"),
    ],
)
def test_fsdp_from_accelerate_config(monkeypatch, tiny_data_dir, tmp_path, env, fragment):
    """``accelerate launch --config_file ...`` hands the FSDP settings to every rank as env vars."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = lf_args(tmp_path / "no-such-model", tiny_data_dir, tmp_path)
    if fragment is None:
        assert integration.validate_args(args)[1] is not None
    else:
        with pytest.raises(MacDropConfigError, match=fragment):
            integration.validate_args(args)


def test_fsdp_training_arguments_that_are_supported(tiny_data_dir, tmp_path):
    for fsdp, config in (("full_shard auto_wrap", None), ("full_shard auto_wrap", {"fsdp_version": 2})):
        args = lf_args(tmp_path / "no-such-model", tiny_data_dir, tmp_path, fsdp=fsdp, fsdp_config=config)
        assert integration.validate_args(args)[1] is not None


def test_moved_internals_fail_with_versions(monkeypatch):
    import llamafactory.train.sft.workflow as sft

    from llamafactory_macdrop.plugin.keys import MacDropConfig

    monkeypatch.delattr(sft, "CustomSeq2SeqTrainer")
    with pytest.raises(integration.IntegrationError) as info:
        with integration.macdrop_trainers(MacDropConfig(macdrop=True), "sft"):
            pass
    message = str(info.value)
    assert "llamafactory 0.9.5" in message
    assert "supported: llamafactory==0.9.5" in message
    assert "CustomSeq2SeqTrainer" in message


def test_trainer_swap_is_undone_after_the_run():
    import llamafactory.train.sft.workflow as sft

    from llamafactory_macdrop.plugin.keys import MacDropConfig

    original = sft.CustomSeq2SeqTrainer
    with integration.macdrop_trainers(MacDropConfig(macdrop=True), "sft") as patched:
        assert sft.CustomSeq2SeqTrainer is patched
        assert issubclass(patched, original)
    assert sft.CustomSeq2SeqTrainer is original
