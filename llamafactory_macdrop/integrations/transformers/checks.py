"""What every host refuses before training, read off the Trainer it built: its arguments and the
model's config, adapter and quantization.

Why here and not at the first step: a bad ``macdrop_k`` or an FSDP variant MacDrop cannot keep
exact should stop the run as the trainer is created, in one line, as LLaMA-Factory's pre-load
checks do. The checks themselves are MacDrop's (:mod:`...plugin.checks`, plain functions over
values); this module only reads the values from a transformers Trainer instead of a
LLaMA-Factory YAML. LLaMA-Factory's own concerns (its stages, ``finetuning_type``, ``use_ray``,
its YAML keys) stay in the LLaMA-Factory checks.

Not decided here, because only the loaded weights tell: the storage of each targeted weight
(:func:`~...core.storage.row_target` refuses, in one line, what no backend masks exactly) and
an epoch curriculum against the epoch count (the Trainer knows it when training starts).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ...plugin.checks import check_dora, check_fsdp, check_model_config, check_pissa, check_zero3_variants
from ...plugin.keys import MacDropConfig, MacDropConfigError
from ...plugin.prequantized import unsupported_checkpoint_reason
from ...plugin.run_args import RunArgs, deepspeed_config, fsdp_setup


def _peft_config(model: Any) -> Optional[Any]:
    """The active adapter's config of a peft model (None without peft)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if active else None
    return configs.get(active) or next(iter(configs.values()))


def _deepspeed(args: Any) -> Optional[dict]:
    """The DeepSpeed config the Trainer runs with (its parsed copy, else the ``deepspeed`` argument)."""
    hf = getattr(args, "hf_deepspeed_config", None)
    if hf is not None and isinstance(getattr(hf, "config", None), dict):
        return hf.config
    return deepspeed_config(getattr(args, "deepspeed", None))


def _fsdp(args: Any, environ=os.environ) -> Optional[dict]:
    fsdp = getattr(args, "fsdp", None)
    if isinstance(fsdp, (list, tuple)):
        fsdp = [getattr(option, "value", option) for option in fsdp]  # transformers' FSDPOption enums
    return fsdp_setup(fsdp, getattr(args, "fsdp_config", None), environ)


def _model_config(model: Any) -> tuple[dict, str]:
    """(config as a dict, where it came from) of the model under its adapter and wrappers."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}, "the model's config"
    name = str(getattr(config, "_name_or_path", "") or "")
    where = os.path.join(name, "config.json") if name and os.path.isdir(name) else "the model's config"
    return config.to_dict(), where


def _embedding_rows(model: Any) -> Optional[int]:
    """How many token ids the model takes now (the vocabulary after any resize)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) and rows > 0 else None


def host_run_args(args: Any, model: Any) -> RunArgs:
    """The values MacDrop's host-independent checks read, from a Trainer's arguments and model."""
    peft = _peft_config(model)
    init = str(getattr(peft, "init_lora_weights", "") or "").lower()
    data = _quantization(model) or {}
    bit = 4 if data.get("load_in_4bit") else 8 if data.get("load_in_8bit") else None
    return RunArgs(
        stage="sft",  # not read by the host checks
        finetuning_type="lora",  # not read by the host checks
        fsdp=_fsdp(args),
        deepspeed=_deepspeed(args),
        quantization_bit=bit,
        use_dora=bool(getattr(peft, "use_dora", False)),
        pissa_init=init.startswith("pissa"),
    )


def _quantization(model: Any) -> Optional[dict]:
    """The model's ``quantization_config`` as config.json has it (transformers keeps the method as
    an enum in the live config: its value, e.g. ``bitsandbytes``)."""
    quantized = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantized is None:
        return None
    data = dict(quantized.to_dict() if hasattr(quantized, "to_dict") else quantized)
    method = data.get("quant_method")
    data["quant_method"] = getattr(method, "value", method)
    return data or None


def check_quantized_model(model: Any) -> None:
    """A model loaded from a checkpoint quantized in a way MacDrop cannot mask exactly (GPTQ, AWQ,
    bitsandbytes 8-bit, ...), named by its ``quantization_config``."""
    data = _quantization(model)
    reason = unsupported_checkpoint_reason(data) if data else None
    if reason:
        raise MacDropConfigError(
            f"MacDrop on a model quantized with quant_method={data.get('quant_method')} is not supported: {reason}"
        )


#: what every host checks on the Trainer it built, in the order a user meets them
HOST_CHECKS = (check_fsdp, check_zero3_variants, check_dora, check_pissa)


def check_trainer(trainer: Any, config: MacDropConfig) -> None:
    """Refuse, in one line, what MacDrop cannot do with this Trainer's arguments and model."""
    model = trainer.model  # with or without an adapter: trained target rows follow docs/how-it-works.md
    values = host_run_args(trainer.args, model)
    for check in HOST_CHECKS:
        check(values, config)
    check_quantized_model(model)
    full, where = _model_config(model)
    if full:
        check_model_config(full, config, where, vocab=_embedding_rows(model))
