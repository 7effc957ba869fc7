"""MacDrop for hosts that take only callbacks: ``MacDropCallback(**macdrop_keys)`` (docs/hosts.md).

Here the host is a plain transformers Trainer built elsewhere; ms-swift's trainers (transformers
Trainer subclasses) take the same object in their callbacks. One mask per optimizer step.

Run (after `make demo`):
    python examples/hosts/callback.py --max-steps 20
"""

from common import arguments, as_text, conversations
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from llamafactory_macdrop import MacDropCallback


def main() -> None:
    cli = arguments(__doc__.splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(cli.model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    rows = [tokenizer(as_text(tokenizer, c), truncation=True, max_length=96) for c in conversations(cli.data)]
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=cli.output_dir,
            max_steps=cli.max_steps,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=2e-4,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=42,
        ),
        train_dataset=rows,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[MacDropCallback(macdrop_p0=0.8)],
    )
    trainer.train()
    print("macdrop_p per logged step:", [h["macdrop_p"] for h in trainer.state.log_history if "macdrop_p" in h])


if __name__ == "__main__":
    main()
