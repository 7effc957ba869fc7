"""Train the planted tiny Llama with a plain ``transformers.Trainer`` under DeepSpeed ZeRO-3, no
LLaMA-Factory, and record from outside what the massive layer's weights were in every forward.

Usage: ``torchrun --nproc_per_node 2 trainer_zero3_check.py OUT TRACE_DIR {with_macdrop,callback}``.

As a user would write it: TrainingArguments with the shipped ``yaml_configs/ds_z3_config.json``
first (so ``from_pretrained`` partitions the weights as it loads them), then the model, LoRA, and
either ``with_macdrop(Trainer, ...)`` or ``Trainer(..., callbacks=[MacDropCallback(...)])``. The
spy is tests/dist_check.py's Recorder (it imports nothing of the package); ``TRACE_DIR/rank{R}.pt``
gets its trace, ``OUT/log_history.json`` the trainer's log (rank 0).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dist_check import _leave_together  # noqa: E402
from helpers import hf_trainer  # noqa: E402
from helpers.hf_trainer import P0, Spy  # noqa: E402


def main() -> None:
    out, trace_dir, how = sys.argv[1], sys.argv[2], sys.argv[3]
    model_dir = os.environ["TINY_LLAMA_DIR"]
    from transformers import AutoTokenizer, Trainer

    from llamafactory_macdrop import MacDropCallback, with_macdrop

    args = hf_trainer.training_args(
        out,
        per_device_train_batch_size=1,
        deepspeed=str(HERE.parent / "yaml_configs" / "ds_z3_config.json"),
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=False,  # DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) places the ranks
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = hf_trainer.lora_model(model_dir)  # loaded under zero.Init: partitioned from the start
    spy = Spy()
    if how == "with_macdrop":
        trainer = with_macdrop(Trainer, macdrop_p0=P0)(
            model=model, args=args, train_dataset=hf_trainer.token_rows(tok), processing_class=tok, callbacks=[spy]
        )
    else:
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=hf_trainer.token_rows(tok),
            processing_class=tok,
            callbacks=[spy, MacDropCallback(macdrop_p0=P0)],
        )
    _leave_together()
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(trace_dir, exist_ok=True)
    torch.save(spy.trace, os.path.join(trace_dir, f"rank{rank}.pt"))
    if rank == 0:
        Path(out, "log_history.json").write_text(json.dumps(trainer.state.log_history))
    sys.stdout.flush()
    sys.stderr.flush()
    torch.distributed.barrier()
    os._exit(0)  # the traces are the result; skip the CPU communicators' teardown (dist_check.main)


if __name__ == "__main__":
    main()
