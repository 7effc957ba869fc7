"""QLoRA, DoRA + QLoRA and earlier adapters through LLaMA-Factory's own ``run_exp``.

The oracle never asks MacDrop anything: a callback finds the planted layer's gate/up BASE layers
by name and measures the weight they compute with through their own forward on the identity
(``type(m).forward(m, I).T``: any storage, 4-bit codes in any layout included). The reference is
the same measurement outside any training step (when training begins, and again after each
evaluation, since bitsandbytes may repack 4-bit weights for CPU inference then). In every
training forward: outside the planted rows bitwise the reference; inside, every element either
the reference or exactly 0, with the same zeros in W_up and W_gate; and the dropped fraction near
p. After every optimizer step the storage bytes and the quant state are bitwise the reference's.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny
from helpers.process import REPO
from transformers import TrainerCallback

pytest.importorskip("bitsandbytes")

P = 0.5
ROWS = tiny.PLANTED_INDICES
KINDS = ("gate_proj", "up_proj")


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight ``module`` (bias-free) computes with, [out, in] float32, through its own forward.
    The input requires grad, so bitsandbytes never repacks the weight because of this measurement."""
    dtype = getattr(module, "compute_dtype", None) or module.weight.dtype
    eye = torch.eye(module.in_features, dtype=dtype).requires_grad_(True)
    with torch.enable_grad():
        return type(module).forward(module, eye).detach().T.float().clone()


def storage_state(module: torch.nn.Module) -> dict:
    """The weight's stored bytes and, for 4-bit weights, the quant state's tensors (bitwise)."""
    state = {"bytes": module.weight.data.reshape(-1).view(torch.uint8).clone()}
    quant = getattr(module.weight, "quant_state", None)
    if quant is not None:
        state["absmax"] = _bits(quant.absmax).clone()
        state["cpu_layout"] = bool(getattr(quant, "packing_format_for_cpu", False))
    return state


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


class EffectiveWeightOracle(TrainerCallback):
    def __init__(self, layer: int = tiny.PLANTED_LAYER) -> None:
        self.suffixes = {kind: f"layers.{layer}.mlp.{kind}.base_layer" for kind in KINDS}
        self.forwards, self.step_end_ok, self.layouts = [], [], []
        self.reference = self.state = None

    def _remeasure(self) -> None:  # outside any training step: nothing may be masked now
        self.reference = {k: effective_weight(m) for k, m in self.modules.items()}
        self.state = {k: storage_state(m) for k, m in self.modules.items()}
        self.layouts.append({k: s.get("cpu_layout") for k, s in self.state.items()})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        found = {
            kind: m for name, m in model.named_modules() for kind, sfx in self.suffixes.items() if name.endswith(sfx)
        }
        assert found.keys() == set(KINDS), list(found)
        self.modules, self.model, self.trainer_state = found, model, state
        self._remeasure()
        self.checkpoint_reference = {k: w.clone() for k, w in self.reference.items()}
        for kind, module in found.items():
            module.register_forward_pre_hook(lambda m, a, kind=kind: self._seen(kind, m))

    def _seen(self, kind, module):
        self.forwards.append(
            dict(
                kind=kind,
                step=self.trainer_state.global_step + 1,
                training=self.model.training,
                now=effective_weight(module),
                reference=self.reference[kind],
            )
        )

    def on_evaluate(self, args, state, control, **kwargs):
        self._remeasure()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_end_ok.append(all(same_state(storage_state(m), self.state[k]) for k, m in self.modules.items()))

    def summary(self) -> dict:
        """What the training forwards saw (figures for the assertions and the report)."""
        others = torch.ones(tiny.INTERMEDIATE, dtype=torch.bool)
        others[ROWS] = False
        training = [f for f in self.forwards if f["training"]]
        out = dict(
            forwards=len(training), outside_changed=0, inside_not_zero_or_same=0, fractions=[], zero_patterns_agree=True
        )
        dropped = {}
        for i, f in enumerate(training):
            now, ref = f["now"], f["reference"]
            out["outside_changed"] += int((_bits(now[others]) != _bits(ref[others])).sum())
            inside, ref_in = now[ROWS], ref[ROWS]
            out["inside_not_zero_or_same"] += int(((_bits(inside) != _bits(ref_in)) & (inside != 0)).sum())
            dropped[i] = (inside == 0) & (ref_in != 0)
            out["fractions"].append(float(dropped[i].sum()) / float((ref_in != 0).sum()))
        for i in range(0, len(training) - 1, 2):  # gate_proj then up_proj, inside one forward of the MLP
            gate, up = training[i], training[i + 1]
            assert (gate["kind"], up["kind"]) == KINDS
            both = (gate["reference"][ROWS] != 0) & (up["reference"][ROWS] != 0)  # where a drop is visible in both
            out["zero_patterns_agree"] &= bool(torch.equal(dropped[i] & both, dropped[i + 1] & both))
        return out


def run_lf(args: dict, callbacks=()) -> None:
    from llamafactory_macdrop.plugin import integration

    integration.activate()
    from llamafactory.train.tuner import run_exp

    run_exp(args, callbacks=list(callbacks))


def qlora_args(model_dir, data_dir, out, **overrides):
    return tiny.lf_train_args(
        model_dir,
        data_dir,
        out,
        quantization_bit=4,
        macdrop_curriculum="constant",
        macdrop_p0=P,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **overrides,
    )


def assert_algorithm1(oracle: EffectiveWeightOracle, summary: dict) -> None:
    assert summary["forwards"] >= 8, summary
    assert summary["outside_changed"] == 0, summary
    assert summary["inside_not_zero_or_same"] == 0, summary
    assert summary["zero_patterns_agree"], summary
    for fraction in summary["fractions"]:
        assert abs(fraction - P) < 0.12, summary["fractions"]
    assert oracle.step_end_ok == [True] * 4


# ----------------------------------------------------------------------------- QLoRA
@pytest.fixture(scope="module")
def dense_rows_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The planted tiny Llama with the planted rows' other entries raised to 0.3 x the planted
    gain: in the plain model they are ~0.02 next to a gain of 1-10, so 4-bit quantization (one
    NF4 block per 64-wide row) makes ~95 % of them the zero code and a mask would have little to
    drop. The planted entries themselves are unchanged, so the locator's answer is too."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("dense_rows_llama")
    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, out / f.name)
    weights = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for kind in KINDS:
        w = weights[f"model.layers.{tiny.PLANTED_LAYER}.mlp.{kind}.weight"]
        for idx in ROWS:
            w[idx, 1:] = torch.randn(w.shape[1] - 1, generator=g) * 0.3 * w[idx, 0]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def qlora_with_eval(dense_rows_llama_dir, tiny_data_dir, tmp_path_factory):
    """sft, quantization_bit 4, constant p = 0.5, an evaluation after step 2 (on an AVX512-BF16 CPU
    bitsandbytes repacks every 4-bit weight into its CPU layout then, and trains on in it)."""
    out = tmp_path_factory.mktemp("qlora")
    oracle = EffectiveWeightOracle()
    run_lf(
        qlora_args(
            dense_rows_llama_dir,
            tiny_data_dir,
            out,
            val_size=0.25,
            eval_strategy="steps",
            eval_steps=2,
            per_device_eval_batch_size=4,
        ),
        [oracle],
    )
    return oracle, out


def test_qlora_masks_exactly_the_planted_rows_in_every_layout(qlora_with_eval, capsys):
    oracle, out = qlora_with_eval
    summary = oracle.summary()
    with capsys.disabled():
        print(
            f"\n[qlora] forwards {summary['forwards']}, outside changed {summary['outside_changed']}, "
            f"dropped fraction {min(summary['fractions']):.3f}..{max(summary['fractions']):.3f}, "
            f"layouts {oracle.layouts}"
        )
    assert_algorithm1(oracle, summary)
    located = json.loads((out / "macdrop_locator.json").read_text())
    assert (located["layer"], located["indices"]) == (tiny.PLANTED_LAYER, ROWS)
    # the probe left the layout alone (on_train_begin and the first training forwards agree) ...
    first = next(f for f in oracle.forwards if f["training"])
    assert torch.equal(_bits(first["reference"]), _bits(oracle.checkpoint_reference[first["kind"]]))
    # ... and the evaluation repacked it exactly where bitsandbytes' own switch says it would
    repacks = bool(next(iter(oracle.modules.values())).support_avx512bf16_for_cpu)
    assert oracle.layouts[0] == {"gate_proj": False, "up_proj": False}
    assert oracle.layouts[-1] == {"gate_proj": repacks, "up_proj": repacks}
    train_steps = {f["step"] for f in oracle.forwards if f["training"]}
    assert train_steps == {1, 2, 3, 4}


def test_dora_with_qlora_is_refused_by_llamafactory_before_training(tiny_llama_dir, tiny_data_dir, tmp_path):
    """LLaMA-Factory 0.9.5 refuses DoRA on a bitsandbytes model while it sets up the adapter
    (docs/recipes.md): the user sees LLaMA-Factory's one-line reason; MacDrop never starts."""
    args = qlora_args(tiny_llama_dir, tiny_data_dir, tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="^DoRA is not compatible with PTQ-quantized models.$"):
        run_lf(args)
    assert not (tmp_path / "macdrop_locator.json").exists()


# ----------------------------------------------------------------------------- an earlier adapter
@pytest.fixture(scope="module")
def earlier_adapter(tiny_llama_dir, tiny_data_dir, tmp_path_factory):
    """A LoRA adapter on gate/up from a short plain run (no MacDrop), with lora_B clearly non-zero
    (only gate/up: an adapter on down_proj would let layer 0's decoy unit reach the residual
    stream, and the probe would then rightly find another layer)."""
    out = tmp_path_factory.mktemp("adapter")
    run_lf(
        tiny.lf_train_args(
            tiny_llama_dir,
            tiny_data_dir,
            out,
            macdrop=False,
            max_steps=3,
            learning_rate=5e-2,
            lora_target="gate_proj,up_proj",
            save_strategy="no",
        )
    )
    assert (out / "adapter_model.safetensors").exists()
    return out


def test_adapter_merged_into_the_base_is_what_the_probe_and_the_masks_see(
    tiny_llama_dir, tiny_data_dir, earlier_adapter, tmp_path
):
    """``adapter_name_or_path`` + ``create_new_adapter``: LLaMA-Factory merges the earlier adapter
    into the base before MacDrop sets up; the masks act on the MERGED rows, nothing else changes."""
    from safetensors.torch import load_file

    oracle = EffectiveWeightOracle()
    run_lf(
        tiny.lf_train_args(
            tiny_llama_dir,
            tiny_data_dir,
            tmp_path,
            adapter_name_or_path=str(earlier_adapter),
            create_new_adapter=True,
            macdrop_curriculum="constant",
            macdrop_p0=P,
            max_steps=4,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
        ),
        [oracle],
    )
    original = load_file(tiny_llama_dir / "model.safetensors")
    up = original[f"model.layers.{tiny.PLANTED_LAYER}.mlp.up_proj.weight"]
    merged = oracle.checkpoint_reference["up_proj"]
    assert not torch.equal(merged, up)  # the merge really changed the base the run trains on
    assert_algorithm1(oracle, oracle.summary())
    located = json.loads((tmp_path / "macdrop_locator.json").read_text())
    assert (located["layer"], located["indices"]) == (tiny.PLANTED_LAYER, ROWS)


# ----------------------------------------------------------------------------- refused before the model loads
REFUSED = {
    "int8": (dict(quantization_bit=8), "quantization_bit=8"),
    "hqq": (dict(quantization_bit=4, quantization_method="hqq"), "quantization_method=hqq"),
    "eetq": (dict(quantization_bit=8, quantization_method="eetq"), "quantization_method=eetq"),
    "zero3": (dict(quantization_bit=4, deepspeed=str(REPO / "yaml_configs" / "ds_z3_config.json")), "ZeRO-3"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_quantized_setups_without_an_exact_backend_are_refused_in_one_line(
    case, tiny_llama_dir, tiny_data_dir, tmp_path
):
    from llamafactory_macdrop.plugin import integration
    from llamafactory_macdrop.plugin.keys import MacDropConfigError

    overrides, named = REFUSED[case]
    with pytest.raises(MacDropConfigError, match=named) as err:
        integration.validate_args(tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, tmp_path, **overrides))
    assert "\n" not in str(err.value)
    integration.validate_args(tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, tmp_path, quantization_bit=4))


@pytest.mark.parametrize(
    "quantization, refused",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method=gptq"),
        ({"quant_method": "awq", "bits": 4}, "quant_method=awq"),
        ({"quant_method": "hqq"}, "quant_method=hqq"),
        ({"quant_method": "eetq"}, "quant_method=eetq"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None),
        ({"quant_method": "fp8"}, None),  # LLaMA-Factory dequantizes FP8 / MXFP4 checkpoints at load
    ],
)
def test_prequantized_checkpoints_are_read_from_config_json(
    quantization, refused, tiny_llama_dir, tiny_data_dir, tmp_path
):
    from llamafactory_macdrop.plugin import integration
    from llamafactory_macdrop.plugin.keys import MacDropConfigError

    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    args = tiny.lf_train_args(folder, tiny_data_dir, tmp_path / "out", quantization_bit=8)  # ignored by LF here
    if refused is None:
        integration.validate_args(args)
        return
    with pytest.raises(MacDropConfigError, match=f"model_name_or_path={folder}.*{refused}"):
        integration.validate_args(args)


def test_llamafactory_cli_prints_the_quantization_refusal_before_loading(tiny_llama_dir, tiny_data_dir, tmp_path):
    import yaml
    from helpers.process import run_cli

    config = tmp_path / "int8.yaml"
    config.write_text(
        yaml.safe_dump(tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, tmp_path / "out", quantization_bit=8))
    )
    proc = run_cli(["llamafactory-cli", "train", str(config)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[macdrop] error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "quantization_bit=8" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_qlora_with_an_earlier_adapter_trains_it_further_on_the_masked_4bit_base(
    dense_rows_llama_dir, tiny_data_dir, earlier_adapter, tmp_path
):
    """LLaMA-Factory cannot merge into a 4-bit base: ``create_new_adapter`` is refused when it
    parses the arguments, and with ``adapter_name_or_path`` alone it loads that adapter and trains
    it further. MacDrop masks the 4-bit base under it, exactly as without an adapter."""
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match="^Cannot create new adapter upon a quantized model.$"):
        run_lf(
            qlora_args(
                dense_rows_llama_dir,
                tiny_data_dir,
                tmp_path,
                adapter_name_or_path=str(earlier_adapter),
                create_new_adapter=True,
            )
        )

    saved = load_file(earlier_adapter / "adapter_model.safetensors")

    class AdapterAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            params = dict(model.named_parameters())
            self.loaded = {
                k: torch.equal(params[k.replace(".weight", ".default.weight")].detach().cpu().float(), v.float())
                for k, v in saved.items()
            }

    oracle, start = EffectiveWeightOracle(), AdapterAtStart()
    run_lf(
        qlora_args(dense_rows_llama_dir, tiny_data_dir, tmp_path, adapter_name_or_path=str(earlier_adapter)),
        [oracle, start],
    )
    assert start.loaded
    assert all(start.loaded.values())  # the earlier adapter, not a fresh one
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())
    assert_algorithm1(oracle, oracle.summary())
