"""What the host examples share: the command line (model, data, output, steps) and the demo data
(examples/data/macdrop_demo.json) as conversations, fed through the tokenizer's chat template when
it has one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"), help="a local model folder")
    parser.add_argument("--data", default=str(REPO / "examples" / "data" / "macdrop_demo.json"))
    parser.add_argument("--output-dir", default=str(REPO / "outputs" / "hosts"))
    parser.add_argument("--max-steps", type=int, default=20)
    return parser.parse_args()


def conversations(path: str) -> list[list[dict]]:
    """The alpaca-style demo records as (user, assistant) conversations."""
    rows = json.loads(Path(path).read_text())
    out = []
    for row in rows:
        prompt = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}])
    return out


def as_text(tokenizer, conversation: list[dict]) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    return "\n".join(turn["content"] for turn in conversation)
