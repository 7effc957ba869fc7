"""The LLaMA-Factory arguments MacDrop's checks read, as LLaMA-Factory itself reads them, in one
small typed shape.

Why: the checks (:mod:`.checks`) need a dozen of LLaMA-Factory's training arguments (stage,
finetuning type, FSDP / DeepSpeed set-up, quantization, DoRA, PiSSA, epochs, resuming, the model
folder). What a value MEANS is LLaMA-Factory's business: the seam (:mod:`.lf.arguments`) parses the
YAML dict or the ``--key value`` list with LLaMA-Factory's own ``HfArgumentParser`` over its own
dataclasses (its defaults, its string-to-bool rules for the command line, a YAML value handed over
as written, its ``__post_init__`` conversions), and hands the parsed values here. A flag is then
on exactly when LLaMA-Factory's code would see it on: Python truth (``use_dora: "false"`` is a
non-empty string, which LLaMA-Factory and peft read as DoRA on). Nothing here imports LLaMA-Factory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

#: LLaMA-Factory arguments that grow the vocabulary beyond config.json's vocab_size
VOCAB_GROWING = ("add_tokens", "add_special_tokens", "new_special_tokens_config", "resize_vocab")
#: every LLaMA-Factory argument the checks read (the seam parses these with LLaMA-Factory's parser)
FIELDS_READ = (
    "stage",
    "finetuning_type",
    "use_ray",  # not a field: LLaMA-Factory sets it from the environment (USE_RAY)
    "use_mca",
    "use_hyper_parallel",
    "fsdp",
    "fsdp_config",
    "deepspeed",
    "quantization_bit",
    "quantization_method",
    "model_name_or_path",
    "cache_dir",
    "model_revision",
    "use_dora",
    "pissa_init",
    "streaming",
    "max_steps",
    "num_train_epochs",
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "additional_target",
    "optim",
    "use_galore",
    "galore_layerwise",
    "use_apollo",
    "apollo_layerwise",
    "seed",
    *VOCAB_GROWING,
)


def flag(value: Any) -> bool:
    """A string flag as transformers and accelerate read their FSDP settings and environment
    variables (``str_to_bool``: y/yes/t/true/on/1, n/no/f/false/off/0, anything else refused)."""
    if isinstance(value, bool):
        return value
    from accelerate.utils import str_to_bool

    return bool(str_to_bool(str(value).strip().lower()))


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
            "reshard_after_forward": flag(strategy != "shard_grad_op" if reshard is None else reshard),
            "offload": "offload" in options or flag(config.get("offload_params", False)),
            "where": "fsdp / fsdp_config",
        }
    if not flag(environ.get("ACCELERATE_USE_FSDP", "false")):
        return None
    strategy = environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    names = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"]  # accelerate's order
    if strategy.isdigit() and 1 <= int(strategy) <= len(names):
        strategy = names[int(strategy) - 1]
    return {
        "version": environ.get("FSDP_VERSION", "1"),
        "strategy": strategy,
        "reshard_after_forward": flag(environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")),
        "offload": flag(environ.get("FSDP_OFFLOAD_PARAMS", "false")),
        "where": "the accelerate config (fsdp_config:)",
    }


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
    """What the checks read of one run's LLaMA-Factory arguments (as LLaMA-Factory parsed them)."""

    stage: str
    finetuning_type: str
    bypasses_trainer: tuple[str, ...] = ()  # use_mca / use_hyper_parallel set true
    fsdp: Optional[dict[str, Any]] = None  # fsdp_setup()
    deepspeed: Optional[dict] = None
    quantization_bit: Any = None  # None: no on-the-fly quantization; else as LLaMA-Factory holds it
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
    additional_target: tuple[str, ...] = ()  # LoRA's modules trained in full (peft's modules_to_save)
    optim: str = ""
    layerwise_optimizer: Optional[str] = None  # use_galore + galore_layerwise, use_apollo + apollo_layerwise
    seed: int = 42

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


def read_run_args(values: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> RunArgs:
    """:class:`RunArgs` from the values LLaMA-Factory's parser gave (``values``: every name in
    :data:`FIELDS_READ`, LLaMA-Factory's defaults filled in, its types)."""
    v = values
    method = v["quantization_method"]
    revision = v["model_revision"]
    layerwise = next(
        (
            f"{on}+{lw}"
            for on, lw in (("use_galore", "galore_layerwise"), ("use_apollo", "apollo_layerwise"))
            if v[on] and v[lw]
        ),
        None,
    )
    return RunArgs(
        stage=str(v["stage"]),
        finetuning_type=str(v["finetuning_type"]),
        # not use_ray: its Ray workers run the HF trainer, where MacDrop acts (plugin/lf/patches.py)
        bypasses_trainer=tuple(k for k in ("use_mca", "use_hyper_parallel") if v[k]),
        fsdp=fsdp_setup(v["fsdp"], v["fsdp_config"], environ),
        deepspeed=deepspeed_config(v["deepspeed"]),
        quantization_bit=v["quantization_bit"],
        quantization_method=str(getattr(method, "value", method) or "bnb").strip().lower(),
        model_name_or_path=str(v["model_name_or_path"]) if v["model_name_or_path"] else None,
        cache_dir=v["cache_dir"],
        model_revision=None if revision in (None, "main") else str(revision),
        use_dora=bool(v["use_dora"]),
        pissa_init=bool(v["pissa_init"]),
        streaming=bool(v["streaming"]),
        max_steps=_number(v, "max_steps"),
        num_train_epochs=_number(v, "num_train_epochs"),
        output_dir=str(v["output_dir"]) if v["output_dir"] else None,
        overwrite_output_dir=bool(v["overwrite_output_dir"]),
        resume_from_checkpoint=str(v["resume_from_checkpoint"]) if v["resume_from_checkpoint"] else None,
        grows_vocabulary=any(bool(v[key]) for key in VOCAB_GROWING),
        additional_target=tuple(str(t) for t in (v["additional_target"] or ())),
        optim=str(getattr(v["optim"], "value", v["optim"]) or ""),
        layerwise_optimizer=layerwise,
        seed=int(_number(v, "seed")),
    )


def _number(values: Mapping[str, Any], key: str) -> float:
    value = values[key]
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        from .keys import MacDropConfigError

        raise MacDropConfigError(f"{key}={value!r} is not allowed: expected a number") from None
