"""Failures and exports: no exception, interruption or export ever leaves masked weights behind."""

import dataclasses
import os

import pytest
import torch
from helpers import tiny
from helpers.process import BIN, run_cli
from safetensors.torch import load_file
from transformers import TrainerCallback

from llamafactory_macdrop.core.storage import bits
from llamafactory_macdrop.plugin import integration

pytestmark = pytest.mark.slow


class Boom(Exception):
    pass


class RaiseInsideStep(TrainerCallback):
    """Raise from INSIDE the forward of optimizer step ``at`` (after the rows were masked)."""

    def __init__(self, exc, at=2):
        self.exc, self.at, self.rows_masked_when_raised = exc, at, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        mlp = model.get_base_model().model.layers[tiny.PLANTED_LAYER].mlp
        self.up = mlp.up_proj.base_layer.weight
        self.original = self.up.detach()[tiny.PLANTED_INDICES].clone()
        self.state = state

        def hook(module, args):
            if self.state.global_step + 1 == self.at:
                self.rows_masked_when_raised = not torch.equal(self.up[tiny.PLANTED_INDICES], self.original)
                raise self.exc

        mlp.down_proj.register_forward_pre_hook(hook)


@pytest.mark.parametrize("exc", [Boom("simulated OOM"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_rows_are_restored_before_an_exception_leaves_the_step(exc, tiny_llama_dir, tiny_data_dir, tmp_path):
    integration.activate()
    from llamafactory.train.tuner import run_exp

    cb = RaiseInsideStep(exc)
    args = tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, tmp_path, macdrop_p0=1.0, macdrop_curriculum="constant")
    with pytest.raises(type(exc)):
        run_exp(args, callbacks=[cb])
    assert cb.rows_masked_when_raised is True  # the exception really came while masked (p = 1)
    original = load_file(tiny_llama_dir / "model.safetensors")
    name = f"model.layers.{tiny.PLANTED_LAYER}.mlp.up_proj.weight"
    assert torch.equal(bits(cb.up.detach()), bits(original[name]))


def test_exported_merge_equals_merge_onto_the_untouched_base(tiny_llama_dir, tiny_data_dir, tmp_path):
    """`llamafactory-cli export` of a MacDrop run (its macdrop_* keys kept in the export YAML, checkpoints saved
    mid-run) equals peft's merge of the same adapter onto the checkpoint from disk, bitwise."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    train_cfg = tiny.lf_train_args(
        tiny_llama_dir,
        tiny_data_dir,
        out,
        save_strategy="steps",
        save_steps=3,
        macdrop_p0=0.9,
        macdrop_curriculum="constant",
    )
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_cfg))
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = run_cli(["llamafactory-cli", "train", str(tmp_path / "train.yaml")], cwd=tmp_path, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = sorted(out.glob("checkpoint-*"))[0]
    # a mid-run checkpoint holds only adapter weights: nothing of the masked base is ever saved
    assert not any(
        "base_layer" in k or ".mlp.up_proj.weight" in k for k in load_file(checkpoint / "adapter_model.safetensors")
    )

    # docs/how-it-works.md: the training YAML without the trainer's keys (LLaMA-Factory's export refuses
    # them), plus the adapter and export_dir; the macdrop_* keys may stay (the plugin drops them)
    from llamafactory.hparams import TrainingArguments

    trainer_keys = {f.name for f in dataclasses.fields(TrainingArguments)}
    export_cfg = {
        **{k: v for k, v in train_cfg.items() if k not in trainer_keys},
        "adapter_name_or_path": str(out),
        "export_dir": str(tmp_path / "merged"),
        "export_size": 1,
        "export_device": "cpu",
    }
    assert {"macdrop", "macdrop_p0", "lora_rank", "template", "dataset"} <= set(export_cfg)
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(export_cfg))
    proc = run_cli(["llamafactory-cli", "export", str(tmp_path / "export.yaml")], cwd=tmp_path, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    merged = load_file(tmp_path / "merged" / "model.safetensors")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).merge_and_unload()
    state = reference.state_dict()
    assert merged
    assert set(merged) <= set(state)
    expected = {k: state[k] for k in merged}
    for name, tensor in expected.items():
        assert torch.equal(bits(merged[name].to(tensor.dtype)), bits(tensor)), name
    # and the massive rows in the merge are not zeroed anywhere
    up = merged[f"model.layers.{tiny.PLANTED_LAYER}.mlp.up_proj.weight"][tiny.PLANTED_INDICES]
    assert (up != 0).all()


def test_macdrop_keys_without_the_plugin_name_the_keys(tiny_data_dir, tmp_path):
    """With the start-up hook off, LLaMA-Factory itself refuses the run and names the keys."""
    import yaml

    cfg = tiny.lf_train_args(tmp_path / "no-model", tiny_data_dir, tmp_path / "out", macdrop_k=3)
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli(
        ["llamafactory-cli", "train", str(tmp_path / "x.yaml")], cwd=tmp_path, env_extra={"MACDROP_AUTOLOAD": "0"}
    )
    assert proc.returncode != 0
    assert "Some keys are not used by the HfArgumentParser" in proc.stderr
    assert "'macdrop_k'" in proc.stderr
    assert "Traceback" in proc.stderr  # LF's own error, not ours: docs/install.md explains it


class WriteFailed(Exception):
    pass


def _break_second_target(dropout):
    """Make the write into the SECOND weight fail, after the first was already written."""

    def broken(snapshot, keep):
        raise WriteFailed("write into the second weight failed")

    dropout.targets[1].apply_mask = broken
    return dropout


def _raw(model):
    return {n: p.detach().clone().view(torch.int32) for n, p in model.named_parameters()}


def _unchanged(model, before):
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach().view(torch.int32), before[n])]


def test_a_failed_mask_write_leaves_no_weight_masked(tiny_llama):
    from llamafactory_macdrop.core.architectures import find_ffn_blocks
    from llamafactory_macdrop.core.masking import RowDropout

    block = find_ffn_blocks(tiny_llama)[tiny.PLANTED_LAYER]
    dropout = _break_second_target(RowDropout(block.row_targets(torch.tensor(tiny.PLANTED_INDICES))))
    before = _raw(tiny_llama)
    with pytest.raises(WriteFailed):
        with dropout.masked(1.0, torch.Generator().manual_seed(0)):
            pass
    assert _unchanged(tiny_llama, before) == []  # the first weight, already zeroed, was restored


def test_a_failed_attack_write_leaves_no_weight_changed(tiny_llama, monkeypatch):
    from llamafactory_macdrop.analysis.attack import attacks

    class Breaking(attacks.RowDropout):
        def __init__(self, targets):
            super().__init__(targets)
            if len(self.targets) > 1:
                _break_second_target(self)

    monkeypatch.setattr(attacks, "RowDropout", Breaking)
    attacker = attacks.ModelAttacker(tiny_llama, attacks.AttackTargets(tiny.PLANTED_LAYER, list(tiny.PLANTED_INDICES)))
    before = _raw(tiny_llama)
    with pytest.raises(WriteFailed):
        with attacker.applied(attacks.AttackSetting("zero", k=5)):
            pass
    assert _unchanged(tiny_llama, before) == []
    attacker.verify_restored()
