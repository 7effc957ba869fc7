"""The planted tiny Llama under a plain transformers / TRL Trainer, no LLaMA-Factory: a LoRA model,
tokenized data, and the spy (tests/dist_check.py's Recorder, which imports nothing of the package)
hooked at ``on_train_begin``.

What the spy records, per training forward of the planted layer's W_up base layer: the optimizer
step and the EFFECTIVE up/gate weights (``forward(I).T``), plus the storage bytes before training
and after each optimizer step. ``dist_check.verify`` then checks them against Algorithm 1 with the
masks its own re-implementation of the seeding rule predicts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from dist_check import Recorder

from helpers import tiny

SEED, STEPS, GA, P0 = 7, 3, 2, 0.8


class Spy(Recorder):
    """dist_check's Recorder for a Trainer built by hand: hooked when training begins."""

    def __init__(self) -> None:
        super().__init__({"layer": tiny.PLANTED_LAYER, "indices": list(tiny.PLANTED_INDICES), "expert": None})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.begin(model, model)

    def finish(self, output_dir) -> dict:
        """The trace, with the run's macdrop_locator.json (what verify checks the located rows against)."""
        self.trace["located"] = json.loads((Path(output_dir) / "macdrop_locator.json").read_text())
        return self.trace


def lora_model(model_dir, dora: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora))


def token_rows(tokenizer, n: int = 32, length: int = 16) -> list[dict]:
    """Causal-LM rows of the tiny corpus, BOS first (as the tokenizer adds it), padded to ``length``."""
    rows = []
    for text in tiny.corpus(n, seed=1):
        enc = tokenizer(text, truncation=True, max_length=length, padding="max_length")
        labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"])]
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return rows


def training_args(out, cls=None, **overrides):
    """Trainer arguments for STEPS optimizer steps of 2 rows x GA micro-batches, logged every step."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GA,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        use_cpu=True,
    )
    values.update(overrides)
    return (cls or TrainingArguments)(**values)


def planted_rows_dropped(trace: dict) -> list[float]:
    """Per masked forward, the fraction of the planted rows' elements that are exactly zero in W_up
    and were not zero before training."""
    idx = list(tiny.PLANTED_INDICES)
    before = trace["original"]["up"][idx] != 0
    out = []
    for _step, weights in trace["forward"]:
        zero = (weights["up"][idx] == 0) & before
        if zero.any():
            out.append(zero.float().sum().item() / before.float().sum().item())
    return out


def masks_by_step(trace: dict) -> dict[int, list[torch.Tensor]]:
    """Optimizer step -> the zero patterns of the planted rows of W_up in each of its forwards."""
    idx = list(tiny.PLANTED_INDICES)
    out: dict[int, list[torch.Tensor]] = {}
    for step, weights in trace["forward"]:
        out.setdefault(step, []).append(weights["up"][idx] == 0)
    return out


def logged_p(log_history: list[dict]) -> list[float]:
    return [entry["macdrop_p"] for entry in log_history if "loss" in entry and "macdrop_p" in entry]
