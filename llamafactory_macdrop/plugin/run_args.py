"""The LLaMA-Factory arguments MacDrop's checks read, parsed ONCE into a small typed shape.

Why: the checks (:mod:`.checks`) need a dozen of LLaMA-Factory's training arguments (stage,
finetuning type, FSDP / DeepSpeed set-up, quantization, DoRA, PiSSA, epochs, resuming, the model
folder). They arrive as a YAML dict or a ``--key value`` list, before LLaMA-Factory parses them;
reading each one once, here, with LLaMA-Factory's own defaults handed in by the seam
(:mod:`.lf.arguments`), lets every check take plain values and be tested without LLaMA-Factory.
Nothing here imports LLaMA-Factory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

#: LLaMA-Factory arguments that grow the vocabulary beyond config.json's vocab_size
VOCAB_GROWING = ("add_tokens", "add_special_tokens", "new_special_tokens_config", "resize_vocab")
#: what the seam must supply: LLaMA-Factory's defaults for the arguments the checks need
DEFAULTS_NEEDED = ("stage", "finetuning_type", "num_train_epochs")


def raw_value(lf_args: Mapping[str, Any] | list[str], key: str, default: Any = None) -> Any:
    """A LLaMA-Factory argument's value as the user gave it (dict or CLI list), else default."""
    if isinstance(lf_args, Mapping):
        return lf_args.get(key, default)
    for i, item in enumerate(lf_args):
        if item == f"--{key}":
            nxt = lf_args[i + 1] if i + 1 < len(lf_args) else "true"
            return "true" if nxt.startswith("--") else nxt
        if item.startswith(f"--{key}="):
            return item.split("=", 1)[1]
    return default


def truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"))


def number(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _unset(value: Any) -> bool:
    return value in (None, False, "", "null", "None", "none", "false", "False")


def fsdp_setup(fsdp: Any, fsdp_config: Any, environ: Mapping[str, str] = os.environ) -> Optional[dict[str, Any]]:
    """The FSDP set-up a run will get, or None without FSDP.

    Two ways in, as in LLaMA-Factory: ``fsdp:`` (+ ``fsdp_config:``) training arguments, which
    transformers turns into accelerate's FSDP plugin; or ``accelerate launch --config_file
    fsdp_config.yaml``, which hands the settings to every rank as ``FSDP_*`` environment variables
    (ACCELERATE_USE_FSDP=true). Returns version (1 or 2), strategy (FSDP1 sharding strategy, upper
    case), reshard_after_forward (FSDP2), offload and the names the user wrote them under.
    """
    if isinstance(fsdp, (list, tuple)):
        fsdp = " ".join(str(x) for x in fsdp)
    fsdp = "" if fsdp is None or fsdp is False else str(fsdp).strip().lower()
    if fsdp in ("", "[]", "false", "none"):
        fsdp = ""
    if fsdp:
        options = ["full_shard"] if fsdp == "true" else fsdp.split()
        config = fsdp_config or {}
        if isinstance(config, str):
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
            "reshard_after_forward": truthy(str(strategy != "shard_grad_op" if reshard is None else reshard).lower()),
            "offload": "offload" in options or truthy(str(config.get("offload_params", False))),
            "where": "fsdp / fsdp_config",
        }
    if not truthy(environ.get("ACCELERATE_USE_FSDP")):
        return None
    strategy = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    names = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"]  # accelerate's order
    if strategy.isdigit() and 1 <= int(strategy) <= len(names):
        strategy = names[int(strategy) - 1]
    return {
        "version": environ.get("FSDP_VERSION", "1"),
        "strategy": strategy,
        "reshard_after_forward": truthy(environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")),
        "offload": truthy(environ.get("FSDP_OFFLOAD_PARAMS", "false")),
        "where": "the accelerate config (fsdp_config:)",
    }


def fsdp_settings(
    lf_args: Mapping[str, Any] | list[str], environ: Mapping[str, str] = os.environ
) -> Optional[dict[str, Any]]:
    """:func:`fsdp_setup` of a run's arguments (``fsdp``, ``fsdp_config``) and environment."""
    return fsdp_setup(raw_value(lf_args, "fsdp", ""), raw_value(lf_args, "fsdp_config"), environ)


def deepspeed_config(value: Any) -> Optional[dict]:
    """The ``deepspeed`` argument as a dict (read from its JSON file), or None."""
    if isinstance(value, str) and value.strip():
        try:
            with open(value, encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, ValueError):
            return None  # LLaMA-Factory / transformers report an unreadable config themselves
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class RunArgs:
    """What the checks read of one run's LLaMA-Factory arguments (LLaMA-Factory's defaults filled in)."""

    stage: str
    finetuning_type: str
    bypasses_trainer: tuple[str, ...] = ()  # use_mca / use_hyper_parallel set true
    fsdp: Optional[dict[str, Any]] = None  # fsdp_setup()
    deepspeed: Optional[dict] = None
    quantization_bit: Optional[str] = None  # None: no on-the-fly quantization
    quantization_method: str = "bnb"
    model_name_or_path: Optional[str] = None
    cache_dir: Optional[str] = None
    model_revision: Optional[str] = None  # None for "main"
    use_dora: bool = False
    pissa_init: bool = False
    streaming: bool = False
    max_steps: float = -1
    num_train_epochs: float = 3.0
    output_dir: Optional[str] = None
    overwrite_output_dir: bool = False
    resume_from_checkpoint: Optional[str] = None
    grows_vocabulary: bool = False
    given: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the raw values, for messages

    @property
    def zero_stage(self) -> Optional[int]:
        stage = ((self.deepspeed or {}).get("zero_optimization") or {}).get("stage")
        return int(stage) if str(stage).isdigit() else None

    @property
    def resumes(self) -> bool:
        """Whether LLaMA-Factory will resume from a checkpoint: ``resume_from_checkpoint`` given, or
        (its parser's rule) ``output_dir`` holds a ``checkpoint-N`` folder and ``overwrite_output_dir`` is off."""
        if self.resume_from_checkpoint is not None:
            return True
        out = self.output_dir
        if not out or self.overwrite_output_dir or not os.path.isdir(out):
            return False
        return any(
            name.startswith("checkpoint-") and name[11:].isdigit() and os.path.isdir(os.path.join(out, name))
            for name in os.listdir(out)
        )


def read_run_args(
    lf_args: Mapping[str, Any] | list[str], defaults: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> RunArgs:
    """Parse the arguments once (``defaults``: LLaMA-Factory's, for :data:`DEFAULTS_NEEDED`)."""

    def get(key: str, default: Any = None) -> Any:
        return raw_value(lf_args, key, default)

    bit = str(get("quantization_bit") or "").strip()
    revision = get("model_revision")
    resume = get("resume_from_checkpoint")
    model = get("model_name_or_path")
    out = get("output_dir")
    return RunArgs(
        stage=str(get("stage", defaults["stage"])),
        finetuning_type=str(get("finetuning_type", defaults["finetuning_type"])),
        # not use_ray: LLaMA-Factory takes it from USE_RAY in the environment only (its parser refuses the
        # key), and its Ray workers run the HF trainer, where MacDrop acts (plugin/lf/patches.py)
        bypasses_trainer=tuple(k for k in ("use_mca", "use_hyper_parallel") if truthy(get(k, False))),
        fsdp=fsdp_setup(get("fsdp", ""), get("fsdp_config"), environ),
        deepspeed=deepspeed_config(get("deepspeed")),
        quantization_bit=None if bit in ("", "None", "none") else bit,
        quantization_method=str(get("quantization_method", "bnb") or "bnb").strip().lower(),
        model_name_or_path=str(model) if model else None,
        cache_dir=get("cache_dir"),
        model_revision=None if revision in (None, "main") else str(revision),
        use_dora=truthy(get("use_dora", False)),
        pissa_init=truthy(get("pissa_init", False)),
        streaming=truthy(get("streaming", False)),
        max_steps=number(get("max_steps", -1), -1),
        num_train_epochs=number(get("num_train_epochs", defaults["num_train_epochs"]), 3.0),
        output_dir=str(out) if out else None,
        overwrite_output_dir=truthy(str(get("overwrite_output_dir", False)).lower()),
        resume_from_checkpoint=None if _unset(resume) else str(resume),
        grows_vocabulary=any(not _unset(get(key)) for key in VOCAB_GROWING),
        given={"quantization_bit": get("quantization_bit")},
    )
