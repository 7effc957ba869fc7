"""docs/api.md is executed: its notebook session runs as a doctest from a folder laid out like the
repository after `make demo`, so every output the page shows is what the API returns."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.process import REPO

pytestmark = pytest.mark.slow


def test_the_notebook_session_prints_what_the_page_shows(smollm2_dir, tmp_path):
    for name in ("models", "tests"):
        (tmp_path / name).symlink_to(REPO / name)
    code = (
        "import doctest, sys; "
        f"r = doctest.testfile({str(REPO / 'docs' / 'api.md')!r}, module_relative=False, "
        "optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE); sys.exit(1 if r.failed or not r.attempted else 0)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert (tmp_path / "api-plots" / "attack_sweep.png").stat().st_size > 0
