"""Uninstalling the plugin (run by scripts/compat.sh AFTER test_installed.py, in its own pytest
call, since it removes the package from this venv): the hook goes with it and LLaMA-Factory works
as before."""

import sysconfig
from pathlib import Path

import yaml
from helpers import tiny
from helpers.process import BIN, run


def test_uninstalling_removes_the_hook_and_leaves_llamafactory_as_it_was(tiny_llama_dir, tiny_data_dir, tmp_path):
    site = Path(sysconfig.get_paths()["purelib"])
    proc = run([str(BIN / "python"), "-m", "pip", "uninstall", "-y", "-q", "llamafactory-macdrop"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (site / "llamafactory_macdrop.pth").exists()
    assert not (site / "llamafactory_macdrop").exists()
    # with macdrop_* keys, LLaMA-Factory alone refuses them as unknown, as it does any unknown key
    cfg = _write_yaml(tmp_path / "keys.yaml", tiny_llama_dir, tiny_data_dir, tmp_path / "keys")
    proc = run([str(BIN / "llamafactory-cli"), "train", str(cfg)], cwd=tmp_path)
    assert proc.returncode != 0
    assert "macdrop" in proc.stderr
    assert "[macdrop]" not in proc.stderr
    # without them it trains as before
    args = tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, tmp_path / "plain")
    args.pop("macdrop")
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(args))
    proc = run([str(BIN / "llamafactory-cli"), "train", str(tmp_path / "plain.yaml")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "plain" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "plain" / "macdrop_locator.json").exists()


def _write_yaml(path, model_dir, data_dir, out, **overrides):
    path.write_text(yaml.safe_dump(tiny.lf_train_args(model_dir, data_dir, out, **overrides)))
    return path
