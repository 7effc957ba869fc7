"""tests/compat runs only through `make compat` (scripts/compat.sh), inside .venv-compat/ where the
plugin is installed from its WHEEL: this checkout must not be importable here (tests/conftest.py
ignores this folder in the normal run)."""

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE.parent))  # tests/helpers/tiny.py: planted models, no import of the package
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

from helpers import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return tiny.build_planted_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return tiny.write_datasets(tmp_path_factory.mktemp("tiny_data"))
