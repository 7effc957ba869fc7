"""docs/hosts.md's examples for the Python hosts run as a user runs them (``python examples/hosts/X.py``),
here on the planted tiny Llama and the tiny alpaca data instead of SmolLM2 and the demo data: each
trains, locates the planted rows and logs ``macdrop_p``. (The LLaMA-Factory example is
tests/cli/test_cli_docs.py's; the axolotl one is loaded by tests/axolotl/.)"""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import tiny
from helpers.process import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", ["hf_trainer.py", "trl_sft.py", "callback.py"])
def test_host_example_runs(script, tiny_llama_dir, tiny_data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "hosts" / script),
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(tiny_data_dir / "tiny_sft.json"),
            "--output-dir",
            str(tmp_path / "out"),
            "--max-steps",
            "3",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("macdrop_p per logged step:")]
    logged = json.loads(line.split(":", 1)[1].strip())
    assert logged == pytest.approx([0.8 * (1 - t / 3) for t in (1, 2, 3)])
    located = json.loads((tmp_path / "out" / "macdrop_locator.json").read_text())
    assert (located["layer"], located["indices"]) == (tiny.PLANTED_LAYER, tiny.PLANTED_INDICES)
    assert re.search(r"MacDrop storage: .*up_proj.* -> dense", proc.stderr)
