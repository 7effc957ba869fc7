"""What the YAML and the model's config.json already refuse, refused by `llamafactory-cli train` in
one line `[macdrop] error: ...` with exit code 2 before the model or the data load; and what a run
with MacDrop off does with its macdrop_* keys (ignores them, unchecked)."""

import json
import os
import shutil

import pytest
import yaml
from helpers import tiny
from helpers.process import BIN, run_cli

from llamafactory_macdrop.plugin import integration
from llamafactory_macdrop.plugin.keys import MacDropConfigError

pytestmark = pytest.mark.slow

#: LLaMA-Factory's first words when it starts loading the tokenizer, the model or the data
LOADING = ("loading configuration file", "Loading dataset", "Loading weights")
BROKEN_LOCATOR = "[1, 2, 3]"
#: a well-formed locator file (its "model" is set per case)
LOCATOR = {"layer": 1, "indices": [97, 13, 64, 5, 120], "modules": ["a", "b"], "source": "probe"}


@pytest.fixture(scope="module")
def config_only(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama's config.json alone (intermediate_size 128, vocab_size 400): a run that got
    past the checks would fail in LLaMA-Factory's loader instead."""
    folder = tmp_path_factory.mktemp("config_only")
    shutil.copy(tiny_llama_dir / "config.json", folder / "config.json")
    return folder


def train(cfg: dict, tmp_path, name="run.yaml"):
    (tmp_path / name).write_text(yaml.safe_dump(cfg))
    return run_cli(
        ["llamafactory-cli", "train", str(tmp_path / name)],
        cwd=tmp_path,
        env_extra={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )


def resumable(out, broken: str):
    """``out`` laid out as an interrupted MacDrop run whose locator file is ``broken``."""
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "macdrop_locator.json").write_text(broken)
    return out


CASES = [
    # issue 26, item 4: checked against config.json before anything loads
    (
        "k",
        dict(macdrop_k=129),
        "macdrop_k=129 is out of range: {model}/config.json has intermediate_size 128 (allowed 1..128)",
    ),
    (
        "probe-id",
        dict(macdrop_probe_token=99999999),
        "macdrop_probe_token=99999999 is outside the vocabulary: {model}/config.json has vocab_size 400 (token ids 0..399)",
    ),
    (
        "probe-empty",
        dict(macdrop_probe_token=""),
        "macdrop_probe_token='' is not allowed: expected a token id >= 0, a non-empty text, or null",
    ),
    # item 6
    (
        "kto",
        dict(stage="kto"),
        "macdrop=true with stage='kto' is not supported (MacDrop is not implemented for KTO's trainer); supported stages: "
        "sft, pt, dpo",
    ),
    # item 2: a locator file that is valid JSON but no object, for an explicit and for LLaMA-Factory's own resume
    (
        "resume",
        dict(resume_from_checkpoint="{out}/checkpoint-2", overwrite_output_dir=False),
        "{out}/macdrop_locator.json is not a MacDrop locator file: it holds a JSON array, not an object with the located "
        "layer and rows: delete {out}/macdrop_locator.json to locate again",
    ),
    (
        "auto-resume",
        dict(overwrite_output_dir=False),
        "{out}/macdrop_locator.json is not a MacDrop locator file: it holds a JSON array, not an object with the located "
        "layer and rows: delete {out}/macdrop_locator.json to locate again",
    ),
]


TRAINED = (
    "macdrop=true with {where} is not supported when the masked rows are trained ({why}): the optimizer steps "
    "inside the masked span there (or on a copy MacDrop does not see), so MacDrop could not keep their update "
    "exactly; train them with plain DDP or a single process, or keep them frozen (LoRA without gate/up "
    "projections in additional_target)"
)

CASES += [
    # issue 32, item 1: rows the optimizer trains, where the set-up cannot keep their update
    (
        "trained-deepspeed",
        dict(lora_target="q_proj", additional_target="gate_proj,up_proj", deepspeed="{ds}"),
        TRAINED.format(where="DeepSpeed", why="additional_target=gate_proj,up_proj"),
    ),
    (
        "trained-fsdp",
        dict(finetuning_type="full", fsdp="full_shard"),
        TRAINED.format(where="FSDP", why="finetuning_type=full"),
    ),
    (
        "trained-lomo",
        dict(finetuning_type="full", optim="adalomo"),
        TRAINED.format(where="optim=adalomo", why="finetuning_type=full"),
    ),
    # item 2: LLaMA-Factory's reading of its own flags (a YAML value as written: "false" is a non-empty string)
    (
        "dora-string-false",
        dict(use_dora="false", macdrop_p0=1.0),
        "macdrop_p0=1.0 with use_dora=true is not supported: near p = 1 (the first steps of every curriculum at p0 = 1) "
        "whole rows get dropped, DoRA's row norm becomes 0 and every loss NaN; use macdrop_p0 < 1",
    ),
    (
        "pissa-1",
        dict(pissa_init=1),
        "macdrop=true with pissa_init=true is not supported: PiSSA moves the principal part of every base weight "
        "into the adapter, so the frozen rows MacDrop would locate and drop are no longer the pre-trained ones; "
        "use pissa_init: false",
    ),
    ("lf-own-refusal", dict(finetuning_type="lorra"), "LLaMA-Factory refuses it: Invalid fine-tuning method."),
    # item 3: the locator file of a resumed run names another model folder
    (
        "resume-other-model",
        dict(resume_from_checkpoint="{out}/checkpoint-2", overwrite_output_dir=False),
        "{out}/macdrop_locator.json was written for model '{other}', this run trains '{model}': delete "
        "{out}/macdrop_locator.json to locate again",
    ),
    # item 7
    (
        "non-massive-all-rows",
        dict(macdrop_scope="non_massive", macdrop_k=128),
        "macdrop_scope='non_massive' with macdrop_k=128 leaves no row to drop: {model}/config.json has "
        "intermediate_size 128, and non_massive drops every row but the 128 massive ones; use fewer than 128 rows, "
        "or another scope",
    ),
    # item 10: a macdrop key spelled with dashes or capitals
    (
        "dashed-key",
        {"macdrop-k": 3},
        "unknown key 'macdrop-k': did you mean 'macdrop_k'? (macdrop keys are lower case, with underscores)",
    ),
    # item 11: quantization_bit 3 is not the 8-bit case; duplicates named with a k mismatch
    (
        "quantization-3",
        dict(quantization_bit=3),
        "quantization_bit=3 is not allowed with quantization_method: bnb: LLaMA-Factory quantizes with bitsandbytes "
        "only at 4 or 8 (the integer), and would load this model unquantized; MacDrop supports quantization_bit: 4, "
        "or none",
    ),
    (
        "indices-duplicates-and-k",
        dict(macdrop_indices=[5, 5], macdrop_k=3),
        "macdrop_indices=[5, 5] is not allowed: expected distinct row indices (found duplicates); macdrop_k=3 "
        "disagrees with macdrop_indices (length 2): give one of them, or make them agree",
    ),
]


@pytest.mark.parametrize("case, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_before_anything_loads(case, overrides, message, config_only, tiny_data_dir, tmp_path):
    out = resumable(tmp_path / "out", BROKEN_LOCATOR) if "resume" in case else tmp_path / "out"
    other = tmp_path / "other_model"
    other.mkdir()
    if case == "resume-other-model":
        (out / "macdrop_locator.json").write_text(json.dumps({**LOCATOR, "model": str(other)}))
    (tmp_path / "ds_z2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}))
    names = {"model": config_only, "out": out, "other": other, "ds": tmp_path / "ds_z2.json"}
    overrides = {k: v.format(**names) if isinstance(v, str) else v for k, v in overrides.items()}
    proc = train(tiny.lf_train_args(config_only, tiny_data_dir, out, **overrides), tmp_path)
    errors = [line for line in proc.stderr.splitlines() if "[macdrop] error" in line]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert errors == [f"[macdrop] error: {message.format(**names)}"]
    assert "Traceback" not in proc.stderr
    assert not any(word in proc.stdout + proc.stderr for word in LOADING)


def test_macdrop_off_ignores_its_keys_unchecked(tiny_llama_dir, tiny_data_dir, tmp_path):
    """docs/configuration.md: without macdrop: true the other keys are removed, named in one
    warning and not validated (macdrop_k: 0 and an unknown key would be refused with MacDrop on)."""
    out = tmp_path / "out"
    cfg = tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, out, macdrop=False, macdrop_k=0, macdrop_kk=3, max_steps=1)
    proc = train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "|macdrop]" in line]
    assert warnings == [
        "[WARNING|macdrop] MacDrop is off (no macdrop: true), so these keys are ignored (not checked): "
        "macdrop_k, macdrop_kk"
    ]
    assert "[macdrop] error" not in proc.stderr
    assert not (out / "macdrop_locator.json").exists()
    assert (out / "adapter_model.safetensors").is_file()
    with pytest.raises(MacDropConfigError, match="macdrop='maybe' is not allowed: expected true or false"):
        integration.validate_args({**cfg, "macdrop": "maybe"})  # the switch itself is still a bool


def _config_folder(tmp_path, name, config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_config_json_bounds_for_moe_multimodal_and_per_layer_widths(tiny_data_dir, tmp_path):
    """macdrop_k against the widest FFN any width key names; vocab_size in a text_config; a
    vocabulary LLaMA-Factory grows is not bounded by config.json."""
    dense = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 400}
    folders = {
        # Qwen2-MoE style: dense layers 128 wide, experts 32, a shared expert 256
        "moe": {
            **dense,
            "model_type": "qwen2_moe",
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 256,
            "num_experts": 4,
        },
        # a multimodal config: the decoder's numbers are in text_config
        "multimodal": {"model_type": "llava", "text_config": {**dense, "intermediate_size": 96, "vocab_size": 300}},
        # Gemma-3n style per-layer widths
        "per_layer": {**dense, "intermediate_size": [64, 160]},
    }
    paths = {name: _config_folder(tmp_path, name, cfg) for name, cfg in folders.items()}

    def check(name, **keys):
        return integration.validate_args(tiny.lf_train_args(paths[name], tiny_data_dir, tmp_path / "out", **keys))

    for name, fine_k, bad_k, key in (
        ("moe", 256, 257, "shared_expert_intermediate_size 256"),
        ("multimodal", 96, 97, "intermediate_size 96"),
        ("per_layer", 160, 161, "intermediate_size 160"),
    ):
        assert (
            check(name, macdrop_k=fine_k)[1].macdrop_k == fine_k
        )  # may still be too wide for the located layer: checked there
        with pytest.raises(
            MacDropConfigError, match=rf"macdrop_k={bad_k} is out of range: .*{name}/config.json has {key} "
        ):
            check(name, macdrop_k=bad_k)
    with pytest.raises(MacDropConfigError, match=r"macdrop_probe_token=300 .* has vocab_size 300 \(token ids 0..299\)"):
        check("multimodal", macdrop_probe_token=300)
    assert check("multimodal", macdrop_probe_token=299)[1] is not None
    assert (
        check("multimodal", macdrop_probe_token=300, add_special_tokens="<x>")[1] is not None
    )  # LF grows the vocabulary


def command_line(cfg: dict) -> list[str]:
    """``llamafactory-cli train --key value ...``: the command-line form, every value a string."""
    out = ["llamafactory-cli", "train"]
    for key, value in cfg.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def cli_train(argv: list[str], tmp_path):
    return run_cli(argv, cwd=tmp_path, env_extra={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--macdrop_probe_token"],
            "--macdrop_probe_token was given without a value: expected int | str | null after it "
            "(e.g. --macdrop_probe_token VALUE)",
        ),
        (
            ["--macdrop-k", "3"],
            "unknown key 'macdrop-k': did you mean 'macdrop_k'? (macdrop keys are lower case, with underscores)",
        ),
        (["--use_dora", "maybe"], "LLaMA-Factory refuses it: argument --use_dora/--use-dora: Truthy value expected"),
    ],
    ids=["bare-key", "dashed-key", "lf-bool"],
)
def test_command_line_keys_refused_in_one_line(extra, message, config_only, tiny_data_dir, tmp_path):
    """issue 32, item 10 (and 2): the ``--key value`` form, before anything loads."""
    argv = command_line(tiny.lf_train_args(config_only, tiny_data_dir, tmp_path / "out")) + extra
    proc = cli_train(argv, tmp_path)
    errors = [line for line in proc.stderr.splitlines() if "[macdrop] error" in line]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(f"[macdrop] error: {message}"), errors
    assert "Traceback" not in proc.stderr
    assert not any(word in proc.stdout + proc.stderr for word in LOADING)


def test_command_line_values_read_as_llamafactory_reads_them(tiny_llama_dir, tiny_data_dir, tmp_path):
    """``--use_dora false`` is False to LLaMA-Factory's parser, so p0 = 1 is no DoRA problem; a probe
    token of non-ASCII digits is a text ('²' was refused as "expected an integer", '٣' read as id 3)."""
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    cfg = tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, out, max_steps=1, gradient_accumulation_steps=1)
    argv = command_line(cfg) + ["--use_dora", "false", "--macdrop_p0", "1.0", "--macdrop_probe_token", "²"]
    proc = cli_train(argv, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is False
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    first = tokenizer("²", add_special_tokens=False)["input_ids"][0]
    assert json.loads((out / "macdrop_locator.json").read_text())["probe_token_id"] == first
    three = integration.validate_args(command_line(cfg)[2:] + ["--macdrop_probe_token", "٣"])[1]
    assert three.macdrop_probe_token == "٣"  # a text, not the id 3


def test_other_spellings_read_in_process(config_only, tiny_data_dir, tmp_path):
    """The same rules as the command-line cases above, in-process (no process each): use_dora: 1 is
    on to LLaMA-Factory, a capitalised key gets its spelling, optim lomo is refused for trained rows."""
    base = tiny.lf_train_args(config_only, tiny_data_dir, tmp_path / "out")
    with pytest.raises(MacDropConfigError, match=r"^macdrop_p0=1.0 with use_dora=true is not supported"):
        integration.validate_args({**base, "use_dora": 1, "macdrop_p0": 1.0})
    with pytest.raises(MacDropConfigError, match=r"^unknown key 'MACDROP_K': did you mean 'macdrop_k'\?"):
        integration.validate_args({**base, "MACDROP_K": 3})
    with pytest.raises(MacDropConfigError, match=r"^macdrop=true with optim=lomo is not supported when the masked"):
        integration.validate_args({**base, "finetuning_type": "full", "optim": "lomo"})
    assert integration.validate_args({**base, "use_dora": 0, "macdrop_p0": 1.0})[1] is not None
