"""The commands a user types: `llamafactory-cli train x.yaml` (unmodified) and `macdrop ...`."""

import json
import math
import os

import pytest
import torch
import yaml
from helpers import tiny
from helpers.process import BIN, run_cli

pytestmark = pytest.mark.slow


def write_yaml(path, model_dir, data_dir, out, **overrides):
    path.write_text(yaml.safe_dump(tiny.lf_train_args(model_dir, data_dir, out, **overrides)))
    return path


def train(yaml_path, *overrides, env=None):
    proc = run_cli(
        ["llamafactory-cli", "train", str(yaml_path), *overrides],
        cwd=yaml_path.parent,
        env_extra={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def logged_p(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return state["max_steps"], {h["step"]: h["macdrop_p"] for h in state["log_history"] if "macdrop_p" in h}


def check_adapter(out, model_dir, dora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is dora
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b
    assert any(p.abs().sum() > 0 for p in b)  # trained, not the zero init
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 6]])).logits).all()


def test_sft_lora_yaml_with_command_line_overrides(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "sft.yaml", tiny_llama_dir, tiny_data_dir, out)
    proc = train(cfg, "macdrop_k=3", "macdrop_p0=0.6")
    located = json.loads((out / "macdrop_locator.json").read_text())
    assert located["layer"] == tiny.PLANTED_LAYER
    assert located["indices"] == tiny.PLANTED_INDICES[:3]
    assert located["modules"] == [f"model.layers.{tiny.PLANTED_LAYER}.mlp.{m}_proj.weight" for m in ("gate", "up")]
    assert "massive layer: 1 (0-based; paper layer 2)" in proc.stdout + proc.stderr
    total, p = logged_p(out)
    assert p == pytest.approx({t: 0.6 * (1 - t / total) for t in range(1, total + 1)})
    check_adapter(out, tiny_llama_dir, dora=False)

    summary = run_cli(
        ["macdrop", "summary", str(out), "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "p.png")],
        cwd=tmp_path,
    )
    assert summary.returncode == 0, summary.stderr
    data = json.loads((tmp_path / "s.json").read_text())
    assert {h["step"]: h["macdrop_p"] for h in data["log"]} == p
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_sft_dora_exp_curriculum(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    cfg = write_yaml(
        tmp_path / "dora.yaml",
        tiny_llama_dir,
        tiny_data_dir,
        out,
        use_dora=True,
        macdrop_curriculum="exp",
        macdrop_alpha=0.2,
    )
    train(cfg)
    total, p = logged_p(out)
    assert p == pytest.approx({t: 0.8 * math.exp(-0.2 * t) for t in range(1, total + 1)})
    check_adapter(out, tiny_llama_dir, dora=True)


def test_pt_lora_epoch_curriculum(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    cfg = write_yaml(
        tmp_path / "pt.yaml",
        tiny_llama_dir,
        tiny_data_dir,
        out,
        stage="pt",
        dataset="tiny_pt",
        macdrop_curriculum="epoch_before",
        num_train_epochs=2,
    )
    train(cfg)
    state = json.loads((out / "trainer_state.json").read_text())
    rows = [h for h in state["log_history"] if "macdrop_p" in h]
    assert len(rows) == state["max_steps"]
    for h in rows:  # the epoch a step belongs to: ceil of the epoch counter after it
        e = max(1, math.ceil(h["epoch"] - 1e-9))
        assert h["macdrop_p"] == pytest.approx(0.8 * (1 - (e - 1) / 2))
    assert {round(h["macdrop_p"], 6) for h in rows} == {0.8, 0.4}
    assert json.loads((out / "macdrop_locator.json").read_text())["indices"] == tiny.PLANTED_INDICES


def test_torchrun_children_run_macdrop(tiny_llama_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "ddp.yaml", tiny_llama_dir, tiny_data_dir, out)
    train(cfg, env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    located = json.loads((out / "macdrop_locator.json").read_text())
    assert located["indices"] == tiny.PLANTED_INDICES
    total, p = logged_p(out)
    assert total == 4
    assert p == pytest.approx({t: 0.8 * (1 - t / 4) for t in range(1, 5)})


@pytest.mark.parametrize("torchrun", [False, True], ids=["single", "torchrun"])
def test_bad_key_fails_in_one_line_before_anything_loads(tiny_data_dir, tmp_path, torchrun):
    cfg = write_yaml(tmp_path / "bad.yaml", tmp_path / "not-a-model", tiny_data_dir, tmp_path / "out", macdrop_p0=1.7)
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"} if torchrun else {}
    proc = run_cli(["llamafactory-cli", "train", str(cfg)], cwd=tmp_path, env_extra=env)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "[macdrop] error" in line]
    assert errors == ["[macdrop] error: macdrop_p0=1.7 is not allowed: expected a float in [0, 1]"]
    assert "Traceback" not in proc.stderr
    assert "Initializing" not in proc.stdout + proc.stderr


def test_macdrop_locate_and_keys(tiny_llama_dir, tiny_data_dir, tmp_path):
    proc = run_cli(
        ["macdrop", "locate", str(tiny_llama_dir), "--k", "5", "--json", str(tmp_path / "loc.json")], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "massive layer: 1 (0-based; paper layer 2)" in proc.stdout
    assert json.loads((tmp_path / "loc.json").read_text())["indices"] == tiny.PLANTED_INDICES
    proc = run_cli(["macdrop", "locate", str(tiny_llama_dir), "--layer", "9"], cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "macdrop: error: macdrop_layer=9 is out of range: the model has layers 0..1"
    )
    streamed = run_cli(
        ["macdrop", "locate", str(tiny_llama_dir), "--layer-by-layer", "--json", str(tmp_path / "s.json")], cwd=tmp_path
    )
    assert streamed.returncode == 0, streamed.stderr
    assert "layer by layer: read layers 0..1," in streamed.stdout
    assert json.loads((tmp_path / "s.json").read_text())["indices"] == tiny.PLANTED_INDICES
    keys = json.loads(run_cli(["macdrop", "keys", "--json"], cwd=tmp_path).stdout)["keys"]
    assert [k["key"] for k in keys][:3] == ["macdrop", "macdrop_k", "macdrop_p0"]


def test_macdrop_locate_probes_what_the_template_puts_first_and_warns_when_nothing_is_massive(tmp_path):
    from helpers import tiny_archs as ta

    chatml = ta.save_chatml_model(tmp_path / "chatml")  # Qwen-style: config BOS <|endoftext|> sets off nothing
    proc = run_cli(["macdrop", "locate", str(chatml), "--json", str(tmp_path / "c.json")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "probe token: 1 '<|im_start|>' (chat template: first token)" in proc.stdout
    data = json.loads((tmp_path / "c.json").read_text())
    assert (data["layer"], data["indices"], data["massive"], data["warnings"]) == (
        ta.PLANTED_LAYER,
        ta.PLANTED_INDICES,
        True,
        [],
    )
    assert [(c["token_id"], c["text"], c["origin_layer"]) for c in data["candidates"]] == [
        (1, "<|im_start|>", ta.PLANTED_LAYER),
        (2, "<|im_end|>", None),
        (0, "<|endoftext|>", None),
    ]
    proc = run_cli(
        [
            "macdrop",
            "locate",
            str(chatml),
            "--template",
            "qwen",
            "--layer-by-layer",
            "--json",
            str(tmp_path / "q.json"),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "q.json").read_text())
    assert (data["probe_token_id"], data["probe_token_source"]) == (1, "template qwen: first token")
    assert (data["layer"], data["indices"]) == (ta.PLANTED_LAYER, ta.PLANTED_INDICES)
    proc = run_cli(["macdrop", "locate", str(chatml), "--template", "nope"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "macdrop: error: --template nope: not a LLaMA-Factory template; allowed: "
    )

    ta.build_tiny_embeddings(origin=False).save_pretrained(tmp_path / "flat")  # nothing massive anywhere
    proc = run_cli(["macdrop", "locate", str(tmp_path / "flat"), "--json", str(tmp_path / "f.json")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # a finding, not an error
    assert proc.stdout.count("warning: no massive activation") == 1
    data = json.loads((tmp_path / "f.json").read_text())
    assert data["massive"] is False
    assert len(data["warnings"]) == 1
    assert [(c["token_id"], c["origin_layer"]) for c in data["candidates"]] == [(ta.BOS, None), (ta.EOS, None)]


def layer_output_max(model_dir, token):
    """Outside measurement: max |residual| leaving each decoder layer at ``token`` alone (forward hooks)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    hooks = [
        layer.register_forward_hook(
            lambda m, a, o: out.append(float((o[0] if isinstance(o, tuple) else o)[0, 0].abs().max()))
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([[token]]))
    for h in hooks:
        h.remove()
    return out


def test_macdrop_locate_probe_token_override_is_the_only_candidate_and_is_reported(tmp_path):
    from helpers import tiny_archs as ta

    # Qwen-style: the chat template starts with <|im_start|> (1), the only token that sets off the planted
    # rows; the config BOS <|endoftext|> (0) sets off nothing (without an override <|im_start|> wins, see above)
    chatml = ta.save_chatml_model(tmp_path / "chatml")
    proc = run_cli(
        ["macdrop", "locate", str(chatml), "--probe-token", "0", "--json", str(tmp_path / "bos.json")], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr  # nothing massive for that token: a finding, not an error
    assert "probe token: 0 '<|endoftext|>' (override)" in proc.stdout
    assert proc.stdout.count("warning: no massive activation") == 1
    data = json.loads((tmp_path / "bos.json").read_text())
    assert (data["probe_token_id"], data["probe_token_text"], data["probe_token_source"]) == (
        0,
        "<|endoftext|>",
        "override",
    )
    assert data["massive"] is False
    assert len(data["warnings"]) == 1
    assert [(c["token_id"], c["source"], c["origin_layer"]) for c in data["candidates"]] == [(0, "override", None)]
    outside = layer_output_max(chatml, 0)
    assert max(outside) < 10
    assert data["candidates"][0]["residual_max"] == pytest.approx(max(outside), rel=1e-4)

    text = run_cli(
        ["macdrop", "locate", str(chatml), "--probe-token", "<|im_start|>", "--json", str(tmp_path / "im.json")],
        cwd=tmp_path,
    )
    assert text.returncode == 0, text.stderr
    assert "probe token: 1 '<|im_start|>' (override: first token of '<|im_start|>')" in text.stdout
    data = json.loads((tmp_path / "im.json").read_text())
    assert (data["probe_token_id"], data["probe_token_source"]) == (1, "override: first token of '<|im_start|>'")
    assert (data["layer"], data["indices"], data["massive"], data["warnings"]) == (
        ta.PLANTED_LAYER,
        ta.PLANTED_INDICES,
        True,
        [],
    )
    assert [c["token_id"] for c in data["candidates"]] == [1]
    outside = layer_output_max(chatml, 1)
    assert outside[ta.PLANTED_LAYER - 1] < 10 < 100 < outside[ta.PLANTED_LAYER]  # created at the planted layer


def test_startup_hook_is_light_and_can_be_switched_off(tmp_path):
    code = "import sys; print('torch' in sys.modules, any(type(f).__name__ == '_LlamaFactoryFinder' for f in sys.meta_path))"
    out = run_cli(["python", "-c", code], cwd=tmp_path).stdout.split()
    assert out == ["False", "True"]  # hook registered, nothing heavy imported at start-up
    check = "import llamafactory.train.tuner as t; print(getattr(t.run_exp, '__macdrop_patched__', False))"
    assert run_cli(["python", "-c", check], cwd=tmp_path).stdout.strip().endswith("True")
    off = run_cli(["python", "-c", check], cwd=tmp_path, env_extra={"MACDROP_AUTOLOAD": "0"})
    assert off.stdout.strip().endswith("False")
