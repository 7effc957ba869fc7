"""MacDrop in a plain transformers Trainer: ``with_macdrop(Trainer, **macdrop_keys)`` (docs/hosts.md).

Run (after `make demo`, which converts SmolLM2-135M-Instruct into models/):
    python examples/hosts/hf_trainer.py --max-steps 20
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

from llamafactory_macdrop import with_macdrop


def main() -> None:
    cli = arguments(__doc__.splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cli.model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    rows = [tokenizer(as_text(tokenizer, c), truncation=True, max_length=96) for c in conversations(cli.data)]

    # the only MacDrop line: the same keys as in a LLaMA-Factory YAML
    MacDropTrainer = with_macdrop(Trainer, macdrop_k=5, macdrop_p0=0.8, macdrop_curriculum="step")

    trainer = MacDropTrainer(
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
    )
    trainer.train()
    print("macdrop_p per logged step:", [h["macdrop_p"] for h in trainer.state.log_history if "macdrop_p" in h])


if __name__ == "__main__":
    main()
