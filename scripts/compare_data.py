"""Alpaca-GPT4 instruction data for `macdrop compare` on CPU, from LLaMA-Factory's PyPI sdist.

Why this data: LLaMA-Factory's source distribution on PyPI (llamafactory-0.9.5.tar.gz) ships
data/alpaca_en_demo.json: 999 English instruction/response pairs in the format of the paper's
training set (alpaca_gpt4_en), so no hub access is needed. The first TRAIN rows become the
training set; the rest become a held-out text file (instruction, input and response of each
example) for perplexity, so the evaluation text was never trained on.

    python scripts/compare_data.py OUT_DIR [--train 640]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llamafactory==0.9.5"
MEMBER = "llamafactory-0.9.5/data/alpaca_en_demo.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=640, help="examples to train on (the rest is held out)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.out / "alpaca_en_demo.json"
    if not source.is_file():
        print(
            f"[compare_data] downloading the {SDIST} source distribution from PyPI (pip builds its metadata "
            "from source: about a minute, silent) to take data/alpaca_en_demo.json out of it",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "-q",
                    "--disable-pip-version-check",
                    "-d",
                    tmp,
                    SDIST,
                ],
                check=True,
            )
            sdist = next(Path(tmp).glob("llamafactory-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                source.write_bytes(tar.extractfile(MEMBER).read())
    rows = json.loads(source.read_text())
    train, held = rows[: args.train], rows[args.train :]
    (args.out / "alpaca_train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False))
    (args.out / "dataset_info.json").write_text(
        json.dumps({"alpaca_train": {"file_name": "alpaca_train.json"}}, indent=1)
    )
    text = "\n\n".join("\n".join(x for x in (r["instruction"], r.get("input", ""), r["output"]) if x) for r in held)
    (args.out / "alpaca_heldout.txt").write_text(text + "\n")
    print(
        f"{len(train)} training examples -> {args.out / 'alpaca_train.json'}; "
        f"{len(held)} held out -> {args.out / 'alpaca_heldout.txt'} ({len(text)} characters)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
