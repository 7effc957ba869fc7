"""Tiny offline models and datasets with known answers, built in milliseconds.

``build_planted_llama`` makes a 2-layer Llama whose massive weights are planted:

* the BOS embedding has a large component in hidden dim 0 (no other token has one);
* layer ``PLANTED_LAYER`` (1): rows ``PLANTED_INDICES`` of W_gate/W_up read dim 0 with
  decreasing gains, so at BOS their intermediate units are huge and ordered as listed; columns
  of W_down write them into residual dim 1, so the residual stream's max jumps ~100x there;
* layer 0 carries a DECOY: intermediate unit ``DECOY_INDEX`` is even larger at BOS but its
  W_down column is zero, so it never reaches the residual stream. Rules based on the largest
  intermediate value, or on its ratio to the median, pick layer 0; the origin rule picks 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PLANTED_LAYER = 1
PLANTED_INDICES = [97, 13, 64, 5, 120]  # largest first
DECOY_INDEX = 50
HIDDEN, INTERMEDIATE = 64, 128

_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing in green trees "
    "numbers add up to ten and twelve minus three is nine please answer briefly with one word "
    "what is the colour of the sky blue grass is green snow is white coal is black"
).split()


def corpus(n: int = 64, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(len(_WORDS), (int(torch.randint(6, 14, (1,), generator=g)),), generator=g)
        out.append(" ".join(_WORDS[i] for i in idx.tolist()))
    return out


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(200) + ["Human: Assistant: \n ? . , 0123456789"], trainer)
    # like a Llama tokenizer, it puts BOS before every text it encodes with special tokens (the
    # analysis commands feed what the tokenizer adds: llamafactory_macdrop/core/text_prefix.py)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    fast.save_pretrained(out_dir)
    return fast


CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_chatml_tokenizer(out_dir: Path):
    """A Qwen-style tokenizer: no BOS, ``<|im_end|>`` as EOS, ``<|endoftext|>`` as pad, a ChatML
    chat template (ids: ``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        corpus(200) + ["system user assistant You are a helpful assistant.\n ? . , 0123456789"], trainer
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_planted_llama(out_dir: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """Save a planted tiny Llama + tokenizer to ``out_dir`` (safetensors, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    plant(model, tok.bos_token_id)
    model.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def plant(model, bos: int) -> None:
    emb = model.get_input_embeddings().weight
    emb[:, 0] = 0.0
    emb[bos, 0] = 5.0
    layers = model.model.layers
    # decoy in layer 0: huge intermediate unit that writes nothing into the residual stream
    mlp0 = layers[0].mlp
    mlp0.gate_proj.weight[DECOY_INDEX, 0] = 1.0
    mlp0.up_proj.weight[DECOY_INDEX, 0] = 400.0
    mlp0.down_proj.weight[:, DECOY_INDEX] = 0.0
    # the real massive weights in PLANTED_LAYER
    mlp = layers[PLANTED_LAYER].mlp
    for rank, idx in enumerate(PLANTED_INDICES):  # rows keep their random entries elsewhere
        mlp.gate_proj.weight[idx, 0] = 1.0
        mlp.up_proj.weight[idx, 0] = 10.0 - 1.5 * rank
        mlp.down_proj.weight[:, idx] = 0.0
        mlp.down_proj.weight[1, idx] = 1.0


def write_datasets(data_dir: Path, n: int = 32) -> Path:
    """Tiny sft (alpaca), pt (text) and dpo (pairwise) datasets plus dataset_info.json."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    texts = corpus(n * 2, seed=1)
    sft = [{"instruction": texts[2 * i], "input": "", "output": texts[2 * i + 1]} for i in range(n)]
    pt = [{"text": t} for t in texts]
    dpo = [
        {
            "instruction": texts[2 * i],
            "input": "",
            "chosen": texts[2 * i + 1],
            "rejected": texts[(2 * i + 3) % len(texts)],
        }
        for i in range(n)
    ]
    for name, rows in (("tiny_sft.json", sft), ("tiny_pt.json", pt), ("tiny_dpo.json", dpo)):
        (data_dir / name).write_text(json.dumps(rows, indent=1))
    info = {
        "tiny_sft": {"file_name": "tiny_sft.json"},
        "tiny_pt": {"file_name": "tiny_pt.json", "columns": {"prompt": "text"}},
        "tiny_dpo": {
            "file_name": "tiny_dpo.json",
            "ranking": True,
            "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
        },
    }
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return data_dir


def lf_train_args(model_dir, data_dir, out, **overrides) -> dict:
    """A small LLaMA-Factory sft + LoRA + MacDrop config over the tiny datasets (8 optimizer steps)."""
    args = dict(
        model_name_or_path=str(model_dir),
        stage="sft",
        do_train=True,
        finetuning_type="lora",
        lora_target="all",
        lora_rank=4,
        dataset="tiny_sft",
        dataset_dir=str(data_dir),
        template="default",
        cutoff_len=48,
        output_dir=str(out),
        overwrite_output_dir=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        macdrop=True,
    )
    args.update(overrides)
    return args


def loud_adapter(model, targets=("up_proj", "gate_proj", "down_proj")):
    """A LoRA-wrapped ``model`` whose adapter would change every measurement if it were active
    (large lora_B), left in train mode: probes must disable it and restore the mode."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 5.0)
    peft_model.train()
    return peft_model
