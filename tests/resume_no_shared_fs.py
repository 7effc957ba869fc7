"""torchrun helper for tests/plugin/test_trainer_loop.py: resume a MacDrop run on 2 ranks where rank 1
cannot see ``output_dir/macdrop_locator.json``, as on a second node without a shared filesystem.

Usage: torchrun --nproc_per_node 2 tests/resume_no_shared_fs.py ARGS.json
"""

import json
import os
import sys

if os.environ.get("RANK") == "1":  # this rank's disk has no copy of rank 0's file
    _isfile = os.path.isfile
    os.path.isfile = lambda path: False if str(path).endswith("macdrop_locator.json") else _isfile(path)

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

from llamafactory_macdrop.plugin import integration  # noqa: E402

integration.activate()
from llamafactory.train.tuner import run_exp  # noqa: E402

with open(sys.argv[1], encoding="utf-8") as f:
    run_exp(json.load(f))
