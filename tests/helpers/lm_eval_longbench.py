"""lm-eval's own tasks/longbench/metrics.py, loaded from its file: the oracle for LongBench scores
(packages it imports that are not installed, jieba for the Chinese tasks, are mocked)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from unittest import mock

LONGBENCH = Path(list(importlib.util.find_spec("lm_eval").submodule_search_locations)[0]) / "tasks" / "longbench"


def lm_eval_metrics():
    absent = {name: mock.MagicMock() for name in ("jieba", "fuzzywuzzy", "rouge") if not importlib.util.find_spec(name)}
    with mock.patch.dict(sys.modules, absent):
        spec = importlib.util.spec_from_file_location("lm_eval_longbench_metrics_oracle", LONGBENCH / "metrics.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module
