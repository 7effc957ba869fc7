"""Every recipe in yaml_configs/ goes through what ``llamafactory-cli train`` does with it, short of
loading a model: LF's YAML reader, the plugin's key validation (integration.validate_args, which
removes the macdrop_* keys), then LF's own HfArgumentParser over its argument dataclasses
(hparams.parser._parse_train_args, unknown keys refused) and LF's model-argument checks. The
dataset name must resolve through the recipe's dataset_dir and the template must exist in LF.

New YAMLs are picked up by the glob. Offline: hub model names are only strings here. The
accelerate launch configs beside them (fsdp*_config.yaml) are read by accelerate's own loader
instead and must pass MacDrop's FSDP rules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers.process import REPO


def _is_accelerate_config(path: Path) -> bool:
    """accelerate launch configs (fsdp*_config.yaml) live beside the recipes; they are not LF YAMLs."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return "compute_environment" in data or "distributed_type" in data


YAMLS = sorted((REPO / "yaml_configs").glob("*.yaml"))
RECIPES = [p for p in YAMLS if not _is_accelerate_config(p)]
ACCELERATE_CONFIGS = [p for p in YAMLS if _is_accelerate_config(p)]
PAPER_GLOBAL_BATCH = 256  # 8 GPUs x 8 x GA 4 (REFERENCE.md section 2)
GPUS_OF_DEEPSPEED_RECIPES = 8  # the ds_z* recipes are launched with NPROC_PER_NODE=8


def parse_recipe(path: Path, monkeypatch) -> tuple:
    """(macdrop config or None, model, data, training, finetuning args) as the plugin + LF parse them."""
    from llamafactory.hparams.parser import (
        _parse_train_args,
        _verify_model_args,
        read_args,
    )
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from llamafactory_macdrop.plugin.integration import validate_args

    monkeypatch.chdir(REPO)  # recipes name yaml_configs/... relative to the repository root
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", str(path)])
    args = read_args(None)  # LF's own YAML reader (OmegaConf)
    lf_args, config = validate_args(args)
    # bf16 recipes are for GPUs; use_cpu lets TrainingArguments validate them on this CPU machine.
    model_args, data_args, training_args, finetuning_args, _ = _parse_train_args({**lf_args, "use_cpu": True})
    unset_hf_deepspeed_config()  # parsing a ZeRO-3 config sets a process-wide flag
    _verify_model_args(model_args, data_args, finetuning_args)
    return config, model_args, data_args, training_args, finetuning_args


def test_the_recipes_exist():
    names = {p.name for p in RECIPES}
    for model in ("llama3_8b", "mistral_7b"):
        for method in ("lora", "dora"):
            assert f"{model}_{method}_macdrop.yaml" in names
            assert f"{model}_{method}_macdrop_ds_z2.yaml" in names
    assert {"llama3_8b_lora_macdrop_ds_z3.yaml", "llama3_8b_qlora_macdrop.yaml", "gemma2_9b_lora.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_with_the_plugin_and_lf(path, monkeypatch):
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.data.template import TEMPLATES

    config, model_args, data_args, training_args, finetuning_args = parse_recipe(path, monkeypatch)

    # the paper's training recipe (REFERENCE.md section 2)
    assert finetuning_args.stage == "sft"
    assert finetuning_args.finetuning_type == "lora"
    assert finetuning_args.lora_rank == 16
    assert finetuning_args.lora_alpha == 16
    assert finetuning_args.lora_target == ["all"]
    assert training_args.learning_rate == 1e-4
    assert training_args.num_train_epochs == 3
    assert training_args.warmup_ratio == 0.05
    assert (training_args.adam_beta1, training_args.adam_beta2) == (0.9, 0.999)
    assert training_args.bf16
    assert data_args.val_size == 0.05
    assert training_args.per_device_train_batch_size == 8
    gpus = GPUS_OF_DEEPSPEED_RECIPES if training_args.deepspeed else 1
    assert gpus * 8 * training_args.gradient_accumulation_steps == PAPER_GLOBAL_BATCH
    assert training_args.output_dir.startswith("saves/")  # gitignored

    # the data: alpaca_gpt4_en through the shipped dataset_info.json, a template LF knows, BOS first
    (dataset,) = get_dataset_list(data_args.dataset, data_args.dataset_dir)
    assert (data_args.dataset, dataset.load_from, dataset.dataset_name) == (
        ["alpaca_gpt4_en"],
        "hf_hub",
        "llamafactory/alpaca_gpt4_en",
    )
    template = TEMPLATES[data_args.template]
    first_slots = template.format_prefix.slots or template.format_user.slots
    assert {"bos_token"} in first_slots, f"{data_args.template} does not start with BOS"

    if training_args.deepspeed:
        ds = REPO / training_args.deepspeed
        stage = json.loads(ds.read_text())["zero_optimization"]["stage"]
        assert path.stem.endswith(f"_ds_z{stage}"), (path.name, ds.name)
    else:
        assert "_ds_z" not in path.stem

    if model_args.quantization_bit is not None:
        assert "qlora" in path.stem
        assert model_args.quantization_bit == 4
        assert not finetuning_args.use_dora  # LF 0.9.5 refuses DoRA on a bitsandbytes model (docs/recipes.md)
    assert finetuning_args.use_dora == ("_dora_" in path.stem)

    if config is None:  # macdrop: false (the Gemma-2 recipe)
        assert "macdrop" not in path.stem
        return
    assert "macdrop" in path.stem
    assert (config.macdrop_k, config.macdrop_p0, config.macdrop_curriculum) == (5, 0.8, "step")
    assert config.macdrop_scope == "massive"
    assert config.macdrop_layer is None
    assert config.macdrop_indices is None
    expected_model = {"llama3_8b": "meta-llama/Meta-Llama-3-8B", "mistral_7b": "mistralai/Mistral-7B-v0.1"}
    assert model_args.model_name_or_path == expected_model[path.stem.split("_")[0] + "_" + path.stem.split("_")[1]]


def _with_line(path: Path, tmp_path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    out = tmp_path / path.name
    out.write_text(text.replace(old, new, 1))
    return out


def test_a_misspelt_lf_key_fails(tmp_path, monkeypatch):
    bad = _with_line(
        REPO / "yaml_configs" / "llama3_8b_lora_macdrop.yaml",
        tmp_path,
        "gradient_accumulation_steps:",
        "gradient_accumulation_step:",
    )
    monkeypatch.delenv("ALLOW_EXTRA_ARGS", raising=False)
    with pytest.raises(ValueError, match="gradient_accumulation_step"):
        parse_recipe(bad, monkeypatch)


def test_a_misspelt_macdrop_key_fails(tmp_path, monkeypatch):
    from llamafactory_macdrop.plugin.keys import MacDropConfigError

    bad = _with_line(
        REPO / "yaml_configs" / "mistral_7b_dora_macdrop.yaml", tmp_path, "macdrop_curriculum:", "macdrop_curicculum:"
    )
    with pytest.raises(MacDropConfigError, match="macdrop_curicculum"):
        parse_recipe(bad, monkeypatch)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.stem for p in ACCELERATE_CONFIGS])
def test_accelerate_config_loads_and_macdrop_accepts_it(path, monkeypatch):
    """accelerate's own loader reads it, and the environment it gives every rank passes MacDrop's
    FSDP rules (plugin/checks.py: check_fsdp), so the shipped FSDP configs are ones MacDrop runs."""
    from accelerate.commands.config.config_args import ClusterConfig

    from llamafactory_macdrop.plugin.integration import fsdp_settings, validate_args

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == "FSDP"
    names = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in config.fsdp_config.items():
        monkeypatch.setenv(key.upper(), str(value).lower() if isinstance(value, bool) else str(value))
    settings = fsdp_settings({})
    assert settings is not None
    assert str(settings["version"]) == str(config.fsdp_config.get("fsdp_version", 1))
    assert settings["strategy"] in names[:1] + names[2:3] or str(settings["version"]) == "2"
    run = {"model_name_or_path": "some/model", "stage": "sft", "finetuning_type": "lora", "macdrop": True}
    validate_args(run)  # must not raise
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")  # and the rules do bite on this environment
    with pytest.raises(Exception, match="offload"):
        validate_args(run)
