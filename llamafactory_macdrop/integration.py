"""The ONLY module that touches LLaMA-Factory internals (tested against llamafactory 0.9.5).

Lifecycle, as seen from ``llamafactory-cli train x.yaml``:

1. ``llamafactory.launcher`` loads -> :func:`patch_launcher` wraps ``launch`` so that, for the
   ``train`` command, the ``macdrop_*`` keys are validated in the launching process, before any
   model is loaded and before torchrun starts children; a bad key ends the command with one line.
2. ``llamafactory.train.tuner`` loads (in the single process, or in every torchrun child) ->
   :func:`patch_tuner` wraps ``run_exp``: it removes the ``macdrop_*`` keys (LLaMA-Factory rejects
   unknown keys), validates them into a :class:`MacDropConfig`, and for the duration of the run
   swaps the stage's trainer class for a subclass with :class:`MacDropTrainerMixin` in front.
   ``export_model`` is wrapped to ignore ``macdrop_*`` keys, so a training YAML can be reused.

Both patches are triggered by the ``.pth`` start-up hook (``_autoload``); :func:`activate` applies
them in-process for notebooks and tests. If LLaMA-Factory's internals are not where this module
expects them, a MacDrop run fails with the version found and the version supported; runs without
``macdrop_*`` keys are passed through untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from .config import MacDropConfig, MacDropConfigError, split_macdrop_args
from .curriculum import can_reach_one

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
    "kto": "not implemented (only sft, pt and dpo are)",
}
_PATCHED = "__macdrop_patched__"


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

    for f in dataclasses.fields(FinetuningArguments):
        if f.name == name:
            return f.default
    raise _internals_error(f"FinetuningArguments has no field '{name}'")


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


def _deepspeed_zero_stage(lf_args: dict[str, Any] | list[str]) -> Optional[int]:
    """The ZeRO stage of the ``deepspeed`` argument (a JSON file or a dict), or None."""
    ds = _lf_value(lf_args, "deepspeed", None)
    if isinstance(ds, str) and ds.strip():
        import json

        try:
            with open(ds, encoding="utf-8") as f:
                ds = json.load(f)
        except (OSError, ValueError):
            return None  # LLaMA-Factory / transformers report an unreadable config themselves
    if not isinstance(ds, dict):
        return None
    stage = (ds.get("zero_optimization") or {}).get("stage")
    return int(stage) if str(stage).isdigit() else None


def _validate_quantization(lf_args: dict[str, Any] | list[str]) -> None:
    """Quantized set-ups MacDrop cannot mask exactly, in one line before the model loads: on-the-fly
    quantization other than bitsandbytes 4-bit, 4-bit under ZeRO-3, and checkpoints that are
    already quantized (read from a local model folder's config.json, see :mod:`.prequantized`)."""
    from .prequantized import checkpoint_quantization, unsupported_checkpoint_reason

    model = _lf_value(lf_args, "model_name_or_path", None)
    quantization = checkpoint_quantization(model) if model else None
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
    config = MacDropConfig.from_raw(raw)
    if not config.enabled:
        return lf_args, None
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
    _validate_quantization(lf_args)
    use_dora = _truthy(_lf_value(lf_args, "use_dora", False))
    if use_dora and can_reach_one(config.macdrop_curriculum, config.macdrop_p0):
        raise MacDropConfigError(
            f"macdrop_p0={config.macdrop_p0} with macdrop_curriculum={config.macdrop_curriculum!r} and use_dora=true "
            "drops whole rows (p = 1), which makes DoRA's row norm 0 and the loss NaN: use macdrop_p0 < 1"
        )
    return lf_args, config


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
def _wrap_run_exp(original, read_args):
    @functools.wraps(original)
    def run_exp(args: Optional[dict[str, Any]] = None, callbacks: Optional[list] = None) -> None:
        args = read_args(args)
        lf_args, config = validate_args(args)
        if config is None:
            return original(lf_args, callbacks)
        from .trainer import logger

        stage = str(_lf_value(lf_args, "stage", _finetuning_default("stage")))
        if _lf_version() != SUPPORTED_LLAMAFACTORY:
            logger.warning("tested with llamafactory==%s, found %s", SUPPORTED_LLAMAFACTORY, _lf_version())
        logger.info(
            "MacDrop on: stage=%s k=%d p0=%g curriculum=%s%s scope=%s",
            stage, config.macdrop_k, config.macdrop_p0, config.macdrop_curriculum,
            f" alpha={config.macdrop_alpha:g}" if config.macdrop_curriculum == "exp" else "", config.macdrop_scope,
        )
        with macdrop_trainers(config, stage):
            return original(lf_args, callbacks)

    setattr(run_exp, _PATCHED, True)
    return run_exp


def _wrap_export(original, read_args):
    @functools.wraps(original)
    def export_model(args: Optional[dict[str, Any]] = None) -> None:
        lf_args, _ = split_macdrop_args(read_args(args))  # training YAMLs can be reused for export
        return original(lf_args)

    setattr(export_model, _PATCHED, True)
    return export_model


def patch_tuner(tuner) -> None:
    """Wrap ``run_exp`` and ``export_model`` of ``llamafactory.train.tuner`` (idempotent)."""
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
    """Wrap ``launch``: early validation, and one-line errors instead of tracebacks."""
    original = getattr(launcher, "launch", None)
    if original is None or getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def launch():
        try:
            if len(sys.argv) > 1 and sys.argv[1] == "train":
                _validate_command_line(list(sys.argv))
            return original()
        except (MacDropConfigError, IntegrationError) as err:
            print(f"[macdrop] error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as err:  # errors raised by the plugin after the model loaded
            from .architectures import UnsupportedArchitectureError
            from .locator import LocatorError
            from .storage import UnsupportedStorageError

            if isinstance(err, (LocatorError, UnsupportedArchitectureError, UnsupportedStorageError)):
                print(f"[macdrop] error: {err}", file=sys.stderr, flush=True)
                sys.exit(2)
            raise

    setattr(launch, _PATCHED, True)
    launcher.launch = launch


def on_module_loaded(module) -> None:
    """Called by the start-up hook right after a watched LLaMA-Factory module executed."""
    if module.__name__ == "llamafactory.launcher":
        patch_launcher(module)
    elif module.__name__ == "llamafactory.train.tuner":
        patch_tuner(module)


def activate() -> None:
    """Apply the patches in this process (when the ``.pth`` hook is disabled or bypassed)."""
    for name in ("llamafactory.launcher", "llamafactory.train.tuner"):
        on_module_loaded(importlib.import_module(name))
