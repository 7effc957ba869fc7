"""What an axolotl configuration with ``macdrop: true`` is refused for, before anything loads.

Runs inside axolotl's config validation (:class:`.args.MacDropArgs`), on the YAML as a dict: the
``macdrop_*`` keys (:class:`~llamafactory_macdrop.plugin.keys.MacDropConfig`), the checks every host
runs on a model's config.json (``check_model_config``, on ``base_model``'s file where it is a local
folder or already in the Hugging Face cache), and axolotl's own settings that take MacDrop off its
definition. What only the loaded trainer tells (FSDP/ZeRO-3 variants, the weights' storage) is
checked when the plugin attaches to the trainer (:func:`~..transformers.checks.check_trainer`).
"""

from __future__ import annotations

from ...core.model_config import read_config_json
from ...plugin.checks import check_dora, check_model_config
from ...plugin.keys import MacDropConfig, MacDropConfigError
from ...plugin.run_args import RunArgs

#: axolotl's ``rl`` values whose trainer is TRL's DPOTrainer (Algorithm 1, the reference forward unmasked)
SUPPORTED_RL = ("dpo", "ipo")


def _raw_keys(data: dict) -> dict:
    return {k: v for k, v in data.items() if (k == "macdrop" or k.startswith("macdrop_")) and v is not None}


def switched_on(data: dict) -> bool:
    """Whether an axolotl config dict turns MacDrop on (``macdrop`` must be a boolean)."""
    return MacDropConfig.switched_on(_raw_keys(data))


def check_axolotl_config(data: dict) -> MacDropConfig:
    """The typed keys of an axolotl config dict with ``macdrop: true``, or a one-line error."""
    config = MacDropConfig.from_raw(_raw_keys(data))
    adapter = data.get("adapter")
    if adapter not in ("lora", "qlora"):
        raise MacDropConfigError(
            f"macdrop=true with adapter={adapter!r} is not supported here: the axolotl plugin is tested with "
            "adapter: lora or qlora (DoRA via peft_use_dora), where MacDrop drops rows of the frozen base weights"
        )
    rl = data.get("rl")
    rl = getattr(rl, "value", rl)
    if rl is not None and str(rl) not in SUPPORTED_RL:
        raise MacDropConfigError(
            f"macdrop=true with rl={rl} is not supported (Algorithm 1 is defined for supervised and DPO training); "
            f"supported: no rl, or rl: {' / '.join(SUPPORTED_RL)}"
        )
    if data.get("load_in_8bit"):
        raise MacDropConfigError(
            "macdrop=true with load_in_8bit=true is not supported: MacDrop masks bitsandbytes 4-bit weights "
            "(load_in_4bit, qlora) exactly, not 8-bit LLM.int8 ones; use load_in_4bit or no quantization"
        )
    if data.get("gptq"):
        raise MacDropConfigError(
            "macdrop=true with gptq=true is not supported: GPTQ layers store packed codes MacDrop cannot mask exactly"
        )
    check_dora(RunArgs(stage="sft", finetuning_type="lora", use_dora=bool(data.get("peft_use_dora"))), config)
    base = data.get("base_model_config") or data.get("base_model")
    found = read_config_json(str(base)) if base else None
    if found is not None:
        path, full = found
        added = data.get("tokens") or data.get("added_tokens_overrides") or data.get("special_tokens")
        check_model_config(
            full, config, path, grows_vocabulary=bool(added) or bool(data.get("resize_token_embeddings_to_32x"))
        )
    return config
