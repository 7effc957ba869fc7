"""tests/axolotl runs in .venv-axolotl (`make axolotl-test`, scripts/axolotl.sh): axolotl 0.19.0 with its
own pins (transformers 5.16.1, peft 0.20.0, trl 1.9.0, accelerate 1.13.0) on the CPU torch 2.13.0,
and the llamafactory-macdrop WHEEL installed --no-deps (not this checkout). tests/ is put on the path
for the planted model (helpers/tiny.py) and the oracle (dist_check.py), which import nothing of the
package."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")

from helpers import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return tiny.build_planted_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return tiny.write_datasets(tmp_path_factory.mktemp("tiny_data"))
