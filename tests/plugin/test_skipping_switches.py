"""LLaMA-Factory's environment switches whose paths never build the trainers MacDrop extends
(``USE_V1``: the v1 rewrite; ``USE_MCA``: mcore_adapter, which LLaMA-Factory reads from the
environment only; ``USE_MEGATRON_BRIDGE``: LLaMA-Factory after 0.9.5): with ``macdrop: true``,
``llamafactory-cli`` stops in one line, exit 2, before anything loads. Without MacDrop the
switches pass untouched (LLaMA-Factory's own messages, not ours)."""

import os

import pytest
import yaml
from helpers import tiny
from helpers.process import BIN, run_cli

pytestmark = pytest.mark.slow

#: LLaMA-Factory's first words when it starts loading the tokenizer, the model or the data
LOADING = ("loading configuration file", "Loading dataset", "Loading weights", "Initializing")


def cli(command, cfg, tmp_path, **env):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return run_cli(
        ["llamafactory-cli", command, str(tmp_path / "run.yaml")],
        cwd=tmp_path,
        env_extra={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env},
        timeout=300,
    )


@pytest.mark.parametrize(
    ("switch", "value", "command"),
    [
        ("USE_V1", "1", "sft"),
        ("USE_V1", "true", "train"),
        ("USE_MCA", "1", "train"),
        ("USE_MEGATRON_BRIDGE", "1", "train"),
    ],
)
def test_a_skipping_switch_is_refused_before_anything_loads(
    switch, value, command, tiny_llama_dir, tiny_data_dir, tmp_path
):
    cfg = tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, tmp_path / "out", max_steps=1)
    proc = cli(command, cfg, tmp_path, **{switch: value})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("[macdrop] error:")]
    assert errors == [
        f"[macdrop] error: macdrop=true with {switch}={value} is not supported: that path runs "
        + {
            "USE_V1": "LLaMA-Factory's v1 trainers (their own loop, whose callbacks only observe and come from LLaMA-Factory)",
            "USE_MCA": "the mcore_adapter (Megatron-Core) trainers (LLaMA-Factory sets use_mca from this variable, "
            "whatever the YAML says)",
            "USE_MEGATRON_BRIDGE": "the Megatron-Bridge trainers",
        }[switch]
        + f", which never get MacDrop; unset {switch}, or remove macdrop: true"
    ]
    assert not any(word in proc.stdout + proc.stderr for word in LOADING)
    assert not (tmp_path / "out").exists()


def test_without_macdrop_the_switch_is_left_to_llamafactory(tiny_llama_dir, tiny_data_dir, tmp_path):
    """USE_MCA=1 without mcore_adapter: LLaMA-Factory's own refusal, no MacDrop line."""
    cfg = tiny.lf_train_args(tiny_llama_dir, tiny_data_dir, tmp_path / "out", max_steps=1, macdrop=False)
    proc = cli("train", cfg, tmp_path, USE_MCA="1")
    assert proc.returncode != 0
    assert "[macdrop]" not in proc.stderr
    assert "mcore_adapter is required when USE_MCA=1" in proc.stderr
