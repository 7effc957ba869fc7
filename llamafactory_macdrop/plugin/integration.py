"""The ONLY module that touches LLaMA-Factory internals (tested against llamafactory 0.9.5).

Lifecycle, as seen from ``llamafactory-cli train x.yaml``:

1. ``llamafactory.launcher`` loads -> :func:`patch_launcher` wraps ``launch`` so that, for the
   ``train`` command, the ``macdrop_*`` keys are validated in the launching process, before any
   model is loaded and before torchrun starts children; a bad key ends the command with one line.
2. ``llamafactory.train.tuner`` loads (in the single process, or in every torchrun child) ->
   :func:`patch_tuner` wraps ``run_exp``: it removes the ``macdrop_*`` keys (LLaMA-Factory rejects
   unknown keys), validates them into a :class:`MacDropConfig`, and for the duration of the run
   swaps the stage's trainer class for a subclass with :class:`MacDropTrainerMixin` in front.
   ``export_model`` is wrapped to ignore ``macdrop_*`` keys, so they may stay in an export YAML.

Both patches are triggered by the ``.pth`` start-up hook (``_autoload``); :func:`activate` applies
them in-process for notebooks and tests. If LLaMA-Factory's internals are not where this module
expects them, a MacDrop run fails with the version found and the version supported; runs without
``macdrop_*`` keys are passed through untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from . import child_errors
from .keys import MacDropConfig, MacDropConfigError, split_macdrop_args

SUPPORTED_LLAMAFACTORY = "0.9.5"

#: stage -> (module, attribute) of the trainer class its workflow instantiates. sft/pt import the
#: class at module level in workflow.py; dpo imports it from dpo/trainer.py inside run_dpo.
TRAINER_SLOTS = {
    "sft": ("llamafactory.train.sft.workflow", "CustomSeq2SeqTrainer"),
    "pt": ("llamafactory.train.pt.workflow", "CustomTrainer"),
    "dpo": ("llamafactory.train.dpo.trainer", "CustomDPOTrainer"),
}
UNSUPPORTED_STAGE_REASON = {
    "rm": "the reward model's value head training is not what MacDrop was defined for",
    "ppo": "PPO's rollouts and value model are outside Algorithm 1",
    "kto": "MacDrop is not implemented for KTO's trainer",
}
_PATCHED = "__macdrop_patched__"
#: set by the patched launcher for its torchrun children: the first rank to fail on a plugin
#: error leaves its message there (:mod:`.child_errors`)
ERROR_FILE_ENV = child_errors.ERROR_FILE_ENV


class IntegrationError(RuntimeError):
    """LLaMA-Factory is not laid out as this plugin expects."""


def _lf_version() -> str:
    try:
        from importlib.metadata import version

        return version("llamafactory")
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


def _internals_error(what: str) -> IntegrationError:
    return IntegrationError(
        f"llamafactory-macdrop cannot hook into llamafactory {_lf_version()}: {what} "
        f"(supported: llamafactory=={SUPPORTED_LLAMAFACTORY})"
    )


# ----------------------------------------------------------------------------- validation
def _lf_value(lf_args: dict[str, Any] | list[str], key: str, default: Any) -> Any:
    """A LLaMA-Factory argument's value as the user gave it (dict or CLI list), else default."""
    if isinstance(lf_args, dict):
        return lf_args.get(key, default)
    for i, item in enumerate(lf_args):
        if item == f"--{key}":
            nxt = lf_args[i + 1] if i + 1 < len(lf_args) else "true"
            return "true" if nxt.startswith("--") else nxt
        if item.startswith(f"--{key}="):
            return item.split("=", 1)[1]
    return default


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"))


def _finetuning_default(name: str) -> Any:
    from llamafactory.hparams import FinetuningArguments

    return _default(FinetuningArguments, name)


def _training_default(name: str) -> Any:
    from llamafactory.hparams import TrainingArguments

    return _default(TrainingArguments, name)


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise _internals_error(f"{cls.__name__} has no field '{name}'")


def _number(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def fsdp_settings(lf_args: dict[str, Any] | list[str]) -> Optional[dict[str, Any]]:
    """The FSDP set-up a run will get, or None without FSDP.

    Two ways in, as in LLaMA-Factory: ``fsdp:`` (+ ``fsdp_config:``) training arguments, which
    transformers turns into accelerate's FSDP plugin; or ``accelerate launch --config_file
    fsdp_config.yaml``, which hands the settings to every rank as ``FSDP_*`` environment variables
    (ACCELERATE_USE_FSDP=true). Returns version (1 or 2), strategy (FSDP1 sharding strategy, upper
    case), reshard_after_forward (FSDP2), offload and the names the user wrote them under.
    """
    fsdp = _lf_value(lf_args, "fsdp", "")
    if isinstance(fsdp, (list, tuple)):
        fsdp = " ".join(str(x) for x in fsdp)
    fsdp = "" if fsdp is None or fsdp is False else str(fsdp).strip().lower()
    if fsdp in ("", "[]", "false", "none"):
        fsdp = ""
    if fsdp:
        options = ["full_shard"] if fsdp == "true" else fsdp.split()
        config = _lf_value(lf_args, "fsdp_config", None) or {}
        if isinstance(config, str):
            import json

            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        config = {k[5:] if k.startswith("fsdp_") else k: v for k, v in dict(config).items()}
        strategy = next((o for o in options if o not in ("offload", "auto_wrap")), "full_shard")
        version = config.get("version", 1)
        reshard = config.get("reshard_after_forward")
        if str(version) != "2" and reshard is not None:
            strategy = str(reshard)  # accelerate spells FSDP1's strategy as reshard_after_forward too
        return {
            "version": version,
            "strategy": strategy.upper(),
            "reshard_after_forward": _truthy(str(strategy != "shard_grad_op" if reshard is None else reshard).lower()),
            "offload": "offload" in options or _truthy(str(config.get("offload_params", False))),
            "where": "fsdp / fsdp_config",
        }
    if not _truthy(os.environ.get("ACCELERATE_USE_FSDP")):
        return None
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    names = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"]  # accelerate's order
    if strategy.isdigit() and 1 <= int(strategy) <= len(names):
        strategy = names[int(strategy) - 1]
    return {
        "version": os.environ.get("FSDP_VERSION", "1"),
        "strategy": strategy,
        "reshard_after_forward": _truthy(os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")),
        "offload": _truthy(os.environ.get("FSDP_OFFLOAD_PARAMS", "false")),
        "where": "the accelerate config (fsdp_config:)",
    }


def _validate_fsdp(lf_args: dict[str, Any] | list[str]) -> None:
    """FSDP variants MacDrop keeps exact (see docs/distributed.md); anything else in one line."""
    fsdp = fsdp_settings(lf_args)
    if fsdp is None:
        return
    where = fsdp["where"]
    version = str(fsdp["version"])
    if version not in ("1", "2"):
        raise MacDropConfigError(f"macdrop=true with fsdp_version={version} in {where} is not supported: use 1 or 2")
    if fsdp["offload"]:
        raise MacDropConfigError(
            f"macdrop=true with FSDP CPU offload (fsdp_offload_params: true / fsdp: offload, in {where}) is not "
            "supported (untested); use fsdp_offload_params: false, or DeepSpeed ZeRO-3"
        )
    if version == "1" and fsdp["strategy"] not in ("FULL_SHARD", "NO_SHARD"):
        raise MacDropConfigError(
            f"macdrop=true with FSDP1 fsdp_sharding_strategy={fsdp['strategy']} in {where} is not supported "
            "(supported: FULL_SHARD, which gathers every forward's weights from the shards MacDrop edits, and "
            "NO_SHARD): use FULL_SHARD, or fsdp_version: 2"
        )
    if version == "2" and not fsdp["reshard_after_forward"]:
        raise MacDropConfigError(
            f"macdrop=true with FSDP2 fsdp_reshard_after_forward=false in {where} is not supported (after the "
            "locator's no-grad probe forward FSDP2 then trains with zero gradients): "
            "use fsdp_reshard_after_forward: true"
        )
    if str(_lf_value(lf_args, "quantization_bit", None) or "").strip() not in ("", "None", "none"):
        raise MacDropConfigError(
            f"macdrop=true with FSDP and quantization_bit={_lf_value(lf_args, 'quantization_bit', None)} is not "
            "supported (FSDP shards the packed 4-bit codes); use DeepSpeed ZeRO-3 or no quantization"
        )


def _deepspeed_config(lf_args: dict[str, Any] | list[str]) -> Optional[dict]:
    """The ``deepspeed`` argument as a dict (read from its JSON file), or None."""
    ds = _lf_value(lf_args, "deepspeed", None)
    if isinstance(ds, str) and ds.strip():
        import json

        try:
            with open(ds, encoding="utf-8") as f:
                ds = json.load(f)
        except (OSError, ValueError):
            return None  # LLaMA-Factory / transformers report an unreadable config themselves
    return ds if isinstance(ds, dict) else None


def _deepspeed_zero_stage(lf_args: dict[str, Any] | list[str]) -> Optional[int]:
    """The ZeRO stage of the ``deepspeed`` argument (a JSON file or a dict), or None."""
    ds = _deepspeed_config(lf_args)
    stage = ((ds or {}).get("zero_optimization") or {}).get("stage")
    return int(stage) if str(stage).isdigit() else None


def _validate_zero3_variants(lf_args: dict[str, Any] | list[str]) -> None:
    """ZeRO-3 variants whose parameters live somewhere the partition edits do not reach: ZeRO++
    hierarchical partitioning (backward gathers from a secondary copy), quantized weight
    communication (gathers a quantized copy) and NVMe parameter offload (partitions swapped out)."""
    if _deepspeed_zero_stage(lf_args) != 3:
        return
    zero = (_deepspeed_config(lf_args) or {}).get("zero_optimization") or {}
    hpz = zero.get("zero_hpz_partition_size", 1)
    reasons = []
    if str(hpz).isdigit() and int(hpz) > 1:
        reasons.append(f"zero_hpz_partition_size={hpz} (ZeRO++ hpZ: backward gathers from a secondary partition copy)")
    if _truthy(str(zero.get("zero_quantized_weights", False)).lower()):
        reasons.append("zero_quantized_weights=true (ZeRO++ qwZ: forward gathers a quantized copy)")
    if str((zero.get("offload_param") or {}).get("device", "none")).lower() == "nvme":
        reasons.append("offload_param.device=nvme (partitions are swapped out to NVMe)")
    if reasons:
        raise MacDropConfigError(
            "macdrop=true with DeepSpeed ZeRO-3 " + "; ".join(reasons) + " is not supported: MacDrop edits each "
            "rank's own partition, which that copy bypasses; use plain ZeRO-3 (ds_z3_config.json) or ZeRO-2"
        )


def _validate_quantization(lf_args: dict[str, Any] | list[str]) -> None:
    """Quantized set-ups MacDrop cannot mask exactly, in one line before the model loads: on-the-fly
    quantization other than bitsandbytes 4-bit, 4-bit under ZeRO-3, and checkpoints that are
    already quantized (read from a local model folder's config.json, see :mod:`.prequantized`)."""
    from .prequantized import checkpoint_quantization, unsupported_checkpoint_reason

    model = _lf_value(lf_args, "model_name_or_path", None)
    quantization = checkpoint_quantization(model, *_cache_location(lf_args)) if model else None
    if quantization is not None:  # LLaMA-Factory then ignores quantization_bit
        reason = unsupported_checkpoint_reason(quantization)
        if reason:
            raise MacDropConfigError(
                f"macdrop=true with model_name_or_path={model}, a checkpoint quantized with quant_method="
                f"{quantization.get('quant_method')} (its config.json), is not supported: {reason}"
            )
        return
    bit = str(_lf_value(lf_args, "quantization_bit", None) or "").strip()
    if bit in ("", "None", "none"):
        return
    method = str(_lf_value(lf_args, "quantization_method", "bnb") or "bnb").strip().lower()
    if method != "bnb":
        raise MacDropConfigError(
            f"macdrop=true with quantization_method={method} (quantization_bit={bit}) is not supported: its layers "
            "store packed codes MacDrop cannot mask exactly; use quantization_method: bnb with quantization_bit: 4"
        )
    if bit != "4":
        raise MacDropConfigError(
            f"macdrop=true with quantization_bit={bit} is not supported: MacDrop masks bitsandbytes 4-bit weights "
            "(quantization_bit: 4, QLoRA) exactly, not 8-bit LLM.int8 ones; use quantization_bit: 4 or none"
        )
    if _deepspeed_zero_stage(lf_args) == 3:
        raise MacDropConfigError(
            "macdrop=true with quantization_bit=4 and DeepSpeed ZeRO-3 is not supported (ZeRO-3 partitions the "
            "packed 4-bit codes, which the 4-bit backend does not address); use ZeRO-2, or no quantization"
        )


def validate_args(args: dict[str, Any] | list[str]) -> tuple[dict[str, Any] | list[str], Optional[MacDropConfig]]:
    """Split and validate; returns (LF's own args, config or None when MacDrop is off).

    Raises :class:`MacDropConfigError` with a one-line message for any bad key or combination.
    """
    lf_args, raw = split_macdrop_args(args)
    if not raw:
        return args, None
    if not MacDropConfig.switched_on(raw):  # MacDrop off: the other keys are ignored, not validated
        return lf_args, None
    config = MacDropConfig.from_raw(raw)
    stage = str(_lf_value(lf_args, "stage", _finetuning_default("stage")))
    if stage not in TRAINER_SLOTS:
        reason = UNSUPPORTED_STAGE_REASON.get(stage, "unknown stage")
        raise MacDropConfigError(
            f"macdrop=true with stage={stage!r} is not supported ({reason}); supported stages: "
            + ", ".join(TRAINER_SLOTS)
        )
    finetuning_type = str(_lf_value(lf_args, "finetuning_type", _finetuning_default("finetuning_type")))
    if finetuning_type != "lora":
        raise MacDropConfigError(
            f"macdrop=true with finetuning_type={finetuning_type!r} is not supported: MacDrop drops rows of "
            "FROZEN pre-trained weights, so it needs finetuning_type=lora (LoRA or DoRA via use_dora)"
        )
    for key in ("use_ray", "use_mca", "use_hyper_parallel"):
        if _truthy(_lf_value(lf_args, key, False)):
            raise MacDropConfigError(f"macdrop=true with {key}=true is not supported (that path bypasses the HF trainer)")
    _validate_fsdp(lf_args)
    _validate_zero3_variants(lf_args)
    _validate_quantization(lf_args)
    _validate_dora(lf_args, config)
    _validate_pissa(lf_args)
    _validate_epoch_curriculum(lf_args, config)
    _validate_model_ranges(lf_args, config)
    _validate_resumed_locator_file(lf_args)
    return lf_args, config


def _resumes(lf_args: dict[str, Any] | list[str]) -> bool:
    """Whether LLaMA-Factory will resume this run from a checkpoint: ``resume_from_checkpoint``
    given, or (its parser's rule) ``output_dir`` holds a ``checkpoint-N`` folder and
    ``overwrite_output_dir`` is off."""
    resume = _lf_value(lf_args, "resume_from_checkpoint", None)
    if resume not in (None, False, "", "null", "None", "none", "false", "False"):
        return True
    out = str(_lf_value(lf_args, "output_dir", "") or "")
    if not out or _truthy(str(_lf_value(lf_args, "overwrite_output_dir", False)).lower()) or not os.path.isdir(out):
        return False
    return any(name.startswith("checkpoint-") and name[11:].isdigit() and os.path.isdir(os.path.join(out, name))
               for name in os.listdir(out))


def _validate_resumed_locator_file(lf_args: dict[str, Any] | list[str]) -> None:
    """A run resumed from a checkpoint reuses ``output_dir/macdrop_locator.json``: a file that is
    not one (truncated, not JSON, not an object, ...) is refused before the model loads, with the
    same line the trainer would print at the first step. Whether it fits the model is checked there."""
    from ..core.locator import LOCATOR_FILE, LocatorError, read_resumed_locator_file

    out = _lf_value(lf_args, "output_dir", None)
    if not out or not _resumes(lf_args):
        return
    path = os.path.join(str(out), LOCATOR_FILE)
    if os.path.isfile(path):
        try:
            read_resumed_locator_file(path)
        except LocatorError as err:
            raise MacDropConfigError(str(err)) from None


def _validate_dora(lf_args: dict[str, Any] | list[str], config: MacDropConfig) -> None:
    """DoRA divides each row by its norm: p0 = 1 can zero a whole row (every curriculum) -> NaN."""
    if _truthy(_lf_value(lf_args, "use_dora", False)) and config.macdrop_p0 >= 1.0:
        raise MacDropConfigError(
            f"macdrop_p0={config.macdrop_p0} with use_dora=true is not supported: near p = 1 (the first steps of every "
            "curriculum at p0 = 1) whole rows get dropped, DoRA's row norm becomes 0 and every loss NaN; use macdrop_p0 < 1"
        )


def _validate_pissa(lf_args: dict[str, Any] | list[str]) -> None:
    """PiSSA rewrites the base weights (W - principal part) before training: not the rows the probe should see."""
    if _truthy(_lf_value(lf_args, "pissa_init", False)):
        raise MacDropConfigError(
            "macdrop=true with pissa_init=true is not supported: PiSSA moves the principal part of every base weight "
            "into the adapter, so the frozen rows MacDrop would locate and drop are no longer the pre-trained ones; "
            "use pissa_init: false"
        )


def _validate_epoch_curriculum(lf_args: dict[str, Any] | list[str], config: MacDropConfig) -> None:
    """Epoch curricula need several epochs; refuse where the YAML already decides they cannot have them.

    With ``max_steps`` the epoch count depends on the dataset size: the trainer checks it at set-up.
    """
    from ..core.curriculum import epoch_curriculum_problem

    if config.macdrop_curriculum not in ("epoch_before", "epoch_after"):
        return
    if _truthy(_lf_value(lf_args, "streaming", False)):
        epochs = sys.maxsize
    elif _number(_lf_value(lf_args, "max_steps", -1), -1) > 0:
        return
    else:
        epochs = math.ceil(_number(_lf_value(lf_args, "num_train_epochs", _training_default("num_train_epochs")), 3.0))
    problem = epoch_curriculum_problem(config.macdrop_curriculum, epochs)
    if problem is not None:
        raise MacDropConfigError(
            f"macdrop_curriculum={config.macdrop_curriculum!r} cannot mean what the paper means here: {problem}; "
            "use macdrop_curriculum: step, exp or constant, or train several epochs"
        )


def _cache_location(lf_args: dict[str, Any] | list[str]) -> tuple[Optional[str], Optional[str]]:
    """LLaMA-Factory's ``cache_dir`` and ``model_revision`` (where a hub model's files are cached)."""
    revision = _lf_value(lf_args, "model_revision", None)
    return _lf_value(lf_args, "cache_dir", None), (None if revision in (None, "main") else str(revision))


def _local_model_config(lf_args: dict[str, Any] | list[str]) -> Optional[tuple[str, dict[str, Any]]]:
    """(path, dict) of the model's ``config.json`` where it is at hand without a download (a local
    folder, or a hub id already in the Hugging Face cache), else None."""
    from ..core.model_config import read_config_json

    folder = _lf_value(lf_args, "model_name_or_path", None)
    return read_config_json(str(folder), *_cache_location(lf_args)) if folder else None


_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
#: LLaMA-Factory arguments that grow the vocabulary beyond config.json's vocab_size
_VOCAB_GROWING = ("add_tokens", "add_special_tokens", "new_special_tokens_config", "resize_vocab")


def _validate_model_ranges(lf_args: dict[str, Any] | list[str], config: MacDropConfig) -> None:
    """What the model's config.json already refuses, before the model (and the data) load.

    ``macdrop_layer``: ``num_hidden_layers`` (GPT-2: ``n_layer``). ``macdrop_indices``:
    ``intermediate_size`` (the width of W_up; Phi-3's fused gate_up_proj holds two halves of that
    size), OPT's ``ffn_dim``, GPT-2's ``n_inner``; skipped for MoE configs, whose expert widths have
    their own keys. ``macdrop_k``: the widest FFN any width key names (:func:`ffn_widths`: dense,
    expert and shared-expert widths, a per-layer list by its widest entry), so no layer can hold k
    rows. ``macdrop_probe_token`` (an id): ``vocab_size``, unless LLaMA-Factory grows the vocabulary
    (``add_tokens``, ``add_special_tokens``, ``resize_vocab``, ...). A multimodal config is read in its
    ``text_config``. Anything not decided here is checked on the loaded model at the first step.
    """
    from ..core.model_config import decoder_config, ffn_widths, vocab_size

    found = _local_model_config(lf_args)
    if found is None:
        return
    path, full = found
    cfg = decoder_config(full)
    token = config.macdrop_probe_token
    vocab = vocab_size(full)
    grows = any(_lf_value(lf_args, key, None) not in (None, False, "", "false", "False") for key in _VOCAB_GROWING)
    if isinstance(token, int) and vocab is not None and token >= vocab and not grows:
        raise MacDropConfigError(
            f"macdrop_probe_token={token} is outside the vocabulary: {path} has vocab_size {vocab} (token ids 0..{vocab - 1})"
        )
    widths = ffn_widths(full)
    if config.macdrop_indices is None and widths and config.macdrop_k > max(widths.values()):
        key, width = max(widths.items(), key=lambda kv: kv[1])
        raise MacDropConfigError(
            f"macdrop_k={config.macdrop_k} is out of range: {path} has {key} {width} (allowed 1..{width})"
        )
    layers = next((cfg[k] for k in ("num_hidden_layers", "n_layer") if isinstance(cfg.get(k), int)), None)
    if config.macdrop_layer is not None and layers is not None and config.macdrop_layer >= layers:
        raise MacDropConfigError(
            f"macdrop_layer={config.macdrop_layer} is out of range: {path} has {layers} layers (0..{layers - 1})"
        )
    if config.macdrop_indices is None or any(k in cfg for k in _MOE_KEYS):
        return
    width = next((cfg[k] for k in ("intermediate_size", "ffn_dim", "n_inner") if isinstance(cfg.get(k), int)), None)
    bad = [i for i in config.macdrop_indices if width is not None and i >= width]
    if bad:
        raise MacDropConfigError(
            f"macdrop_indices={list(config.macdrop_indices)}: {bad} outside 0..{width - 1} "
            f"(intermediate size {width} in {path})"
        )


def check_train_config(args: dict[str, Any]) -> Optional[MacDropConfig]:
    """What ``llamafactory-cli train`` would refuse of this YAML dict, before anything trains
    (``macdrop compare`` checks every arm first): MacDrop's own checks, then LLaMA-Factory's
    argument parser (unknown keys, bad values). ``deepspeed`` is left out of the parse, because
    HF builds its DeepSpeed state there, which needs the launcher's distributed environment;
    MacDrop's checks above read that config themselves. Raises one-line errors."""
    lf_args, config = validate_args(args)
    try:
        from llamafactory.hparams.parser import _parse_train_args
    except ImportError as err:  # pragma: no cover - moved internals: the runs themselves will say it
        raise _internals_error(f"llamafactory.hparams.parser._parse_train_args ({err})") from None
    probe = {k: v for k, v in dict(lf_args).items() if k != "deepspeed"}
    try:
        _parse_train_args(probe)
    except (ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MacDropConfigError(f"LLaMA-Factory refuses it: {first}") from None
    return config


def ignored_macdrop_keys(args: dict[str, Any] | list[str]) -> list[str]:
    """``macdrop_*`` keys a run without ``macdrop: true`` would silently drop (not validated)."""
    _, raw = split_macdrop_args(args)
    if not raw or MacDropConfig.switched_on(raw):
        return []
    return [k for k in raw if k != "macdrop"]


# ----------------------------------------------------------------------------- trainer swap
def macdrop_trainer_class(base: type, config: MacDropConfig) -> type:
    """``base`` with the MacDrop mixin in front, carrying ``config``."""
    from .trainer import MacDropDPOTrainerMixin, MacDropTrainerMixin

    mixin = MacDropDPOTrainerMixin if hasattr(base, "compute_reference_log_probs") else MacDropTrainerMixin
    return type(f"MacDrop{base.__name__}", (mixin, base), {"macdrop_config": config, "__module__": __name__})


@contextmanager
def macdrop_trainers(config: MacDropConfig, stage: str) -> Iterator[type]:
    """Swap the stage's trainer class for the MacDrop one while the run lasts."""
    module_name, attr = TRAINER_SLOTS[stage]
    try:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise _internals_error(f"{module_name}.{attr} not found ({err})") from err
    if not hasattr(original, "training_step"):
        raise _internals_error(f"{module_name}.{attr} is not a transformers Trainer")
    patched = macdrop_trainer_class(original, config)
    setattr(module, attr, patched)
    try:
        yield patched
    finally:
        setattr(module, attr, original)


# ----------------------------------------------------------------------------- patches
def lf_template(name: str):
    """LLaMA-Factory's chat template ``name`` (``macdrop locate --template NAME``), for
    :func:`~llamafactory_macdrop.core.first_token.template_first_token`."""
    from ..core.locator import LocatorError

    try:
        from llamafactory.data.template import TEMPLATES
    except ImportError as err:
        raise LocatorError(f"--template {name}: LLaMA-Factory's templates need llamafactory installed ({err})") from None
    if name not in TEMPLATES:
        raise LocatorError(f"--template {name}: not a LLaMA-Factory template; allowed: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def plugin_errors() -> tuple[type, ...]:
    """The exceptions that are MacDrop's own verdicts: printed as one line, not a traceback."""
    from ..core.architectures import UnsupportedArchitectureError
    from ..core.locator import LocatorError
    from ..core.storage import UnsupportedStorageError
    from .trainer import NonFiniteTrainingError

    return (MacDropConfigError, IntegrationError, LocatorError, UnsupportedArchitectureError, UnsupportedStorageError,
            NonFiniteTrainingError)


def _torchrun_child() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _end_child_with(err: Optional[BaseException]) -> None:
    """A torchrun child's exit after a plugin error: ONE line for the whole job, not one traceback per rank.

    ``err``: this rank's plugin error; None when this rank's own error (a collective broken by a
    peer that has gone) follows another rank's plugin error, which then speaks for the job.

    Launched by ``llamafactory-cli`` (whose patched launcher set :data:`ERROR_FILE_ENV`, a file
    local to each node), the first rank of the node to fail, whichever rank it is, records its
    message; every child exits 0, so torchrun adds no failure report of its own, and the node's
    ``llamafactory-cli`` prints the line and exits 2. A rank that does not fail itself ends
    quietly when its collective breaks because the failed rank has gone (gloo), or, when that
    collective never returns (NCCL), is ended by its watcher thread a grace period after the
    message appeared (:func:`.child_errors.start_watcher`). Launched by torchrun directly, the
    first failing rank prints the line and exits 2, and torchrun stops the others.

    Known limit: both signals are node-local. With several nodes the nodes where no rank failed
    learn of it only through their collectives: those fail (gloo: the peer closed the
    connection, a traceback per rank) or wait until the process-group timeout (``ddp_timeout``;
    LLaMA-Factory's default is 180000000 s, so set one for multi-node runs).
    """
    code = child_errors.report(str(err) or type(err).__name__) if err is not None else child_errors.end_quietly()
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort while exiting
        pass
    sys.exit(code)


def _wrap_run_exp(original, read_args):
    @functools.wraps(original)
    def run_exp(args: Optional[dict[str, Any]] = None, callbacks: Optional[list] = None) -> None:
        child = args is None and _torchrun_child()  # the command line's run, not a caller's
        try:
            return _run_exp(original, read_args(args), callbacks, watch=child)
        except Exception as err:
            if child and isinstance(err, plugin_errors()):
                _end_child_with(err)
            if child and child_errors.peer_failed():
                _end_child_with(None)
            raise

    setattr(run_exp, _PATCHED, True)
    return run_exp


def _run_exp(original, args: dict[str, Any] | list[str], callbacks: Optional[list], watch: bool = False) -> None:
    """``watch``: a torchrun child's command-line run, which watches for its peers' plugin errors."""
    lf_args, config = validate_args(args)
    if config is None:
        ignored = ignored_macdrop_keys(args)
        if ignored and os.environ.get("RANK", "0") == "0":
            from .trainer import logger

            logger.warning("MacDrop is off (no macdrop: true), so these keys are ignored (not checked): %s", ", ".join(ignored))
        return original(lf_args, callbacks)
    from .trainer import logger

    if watch:
        child_errors.start_watcher()
    stage = str(_lf_value(lf_args, "stage", _finetuning_default("stage")))
    if _lf_version() != SUPPORTED_LLAMAFACTORY:
        logger.warning("tested with llamafactory==%s, found %s", SUPPORTED_LLAMAFACTORY, _lf_version())
    logger.info(
        "MacDrop on: stage=%s k=%d p0=%g curriculum=%s%s scope=%s mask_per=%s",
        stage, config.macdrop_k, config.macdrop_p0, config.macdrop_curriculum,
        f" alpha={config.macdrop_alpha:g}" if config.macdrop_curriculum == "exp" else "", config.macdrop_scope,
        config.macdrop_mask_per,
    )
    with macdrop_trainers(config, stage):
        return original(lf_args, callbacks)


def _wrap_export(original, read_args):
    @functools.wraps(original)
    def export_model(args: Optional[dict[str, Any]] = None) -> None:
        lf_args, _ = split_macdrop_args(read_args(args))  # macdrop_* keys may stay in an export YAML
        return original(lf_args)

    setattr(export_model, _PATCHED, True)
    return export_model


def patch_tuner(tuner) -> None:
    """Wrap ``run_exp`` and ``export_model`` of ``llamafactory.train.tuner``, and what LlamaBoard
    reads of a run (``LogCallback``: :mod:`.llamaboard`) (idempotent)."""
    from . import llamaboard

    try:
        from llamafactory.train.callbacks import LogCallback
    except ImportError as err:  # a moved class costs LlamaBoard's macdrop_p only: say so, go on
        from .trainer import logger

        logger.warning(f"LLaMA-Factory's LogCallback not found ({err}): macdrop_p will be missing from "
                       "trainer_log.jsonl and LlamaBoard; it is still in trainer_state.json")
    else:
        llamaboard.patch_log_callback(LogCallback)
    read_args = getattr(tuner, "read_args", None)
    for name, wrap in (("run_exp", _wrap_run_exp), ("export_model", _wrap_export)):
        fn = getattr(tuner, name, None)
        if fn is None or read_args is None or getattr(fn, _PATCHED, False):
            continue  # a missing function surfaces as LF's own 'keys are not used' error
        setattr(tuner, name, wrap(fn, read_args))


def _validate_command_line(argv: list[str]) -> None:
    """Validate ``llamafactory-cli train ...`` arguments in the launching process."""
    from llamafactory.hparams.parser import read_args

    saved = sys.argv
    sys.argv = [argv[0]] + argv[2:]  # what run_exp will see once 'train' is popped
    try:
        args = read_args(None)
    finally:
        sys.argv = saved
    validate_args(args)


def patch_launcher(launcher) -> None:
    """Wrap ``launch``: early validation, and one-line errors instead of tracebacks.

    For ``train`` it also hands torchrun children (``FORCE_TORCHRUN=1``, several devices) a file
    in :data:`ERROR_FILE_ENV`: the first child that stops on a plugin error leaves its message
    there, the others end (see :func:`_end_child_with`), and this process prints it as the same
    one line.
    """
    original = getattr(launcher, "launch", None)
    if original is None or getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def launch():
        error_file = None
        try:
            if len(sys.argv) > 1 and sys.argv[1] == "train":
                _validate_command_line(list(sys.argv))
                fd, error_file = tempfile.mkstemp(prefix="macdrop-error-", suffix=".txt")
                os.close(fd)
                os.environ[ERROR_FILE_ENV] = error_file
            try:
                return original()
            finally:
                message = _read_and_remove(error_file)
                if message:
                    print(f"[macdrop] error: {message}", file=sys.stderr, flush=True)
                    sys.exit(2)
        except plugin_errors() as err:
            print(f"[macdrop] error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    setattr(launch, _PATCHED, True)
    launcher.launch = launch


def _read_and_remove(path: Optional[str]) -> str:
    """The children's message, once torchrun returned; the file and its claim are removed."""
    if not path:
        return ""
    os.environ.pop(ERROR_FILE_ENV, None)
    try:
        return child_errors.read(path)
    finally:
        child_errors.discard(path)


def on_module_loaded(module) -> None:
    """Called by the start-up hook right after a watched LLaMA-Factory module executed."""
    if module.__name__ == "llamafactory.launcher":
        patch_launcher(module)
    elif module.__name__ == "llamafactory.train.tuner":
        patch_tuner(module)
    elif module.__name__ == "llamafactory.extras.ploting":
        from .llamaboard import patch_loss_plot

        patch_loss_plot(module)


def activate() -> None:
    """Apply the patches in this process (when the ``.pth`` hook is disabled or bypassed)."""
    for name in ("llamafactory.launcher", "llamafactory.train.tuner", "llamafactory.extras.ploting"):
        on_module_loaded(importlib.import_module(name))
