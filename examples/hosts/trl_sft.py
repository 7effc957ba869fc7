"""MacDrop in TRL's SFTTrainer: ``with_macdrop(SFTTrainer, **macdrop_keys)`` (docs/hosts.md). The
same line takes ``DPOTrainer`` (its reference forward, the model with the adapter off, sees the
original rows).

Run (after `make demo`):
    python examples/hosts/trl_sft.py --max-steps 20
"""

from common import arguments, conversations
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from llamafactory_macdrop import with_macdrop


def main() -> None:
    cli = arguments(__doc__.splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    # conversations through the model's chat template where it has one, else prompt + completion text
    rows = conversations(cli.data)
    if tokenizer.chat_template:
        data = Dataset.from_list([{"messages": c} for c in rows])
    else:
        data = Dataset.from_list([{"prompt": c[0]["content"] + "\n", "completion": c[1]["content"]} for c in rows])
    trainer = with_macdrop(SFTTrainer, macdrop_p0=0.8)(
        model=cli.model,
        args=SFTConfig(
            output_dir=cli.output_dir,
            max_steps=cli.max_steps,
            max_length=96,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=2e-4,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=False,
            seed=42,
        ),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainer.train()
    print("macdrop_p per logged step:", [h["macdrop_p"] for h in trainer.state.log_history if "macdrop_p" in h])


if __name__ == "__main__":
    main()
