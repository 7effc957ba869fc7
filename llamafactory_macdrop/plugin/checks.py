"""The checks a MacDrop run passes before anything loads: one named function per concern, each
taking the parsed arguments (:class:`.run_args.RunArgs`) and the typed keys (:class:`.keys.MacDropConfig`)
and raising :class:`.keys.MacDropConfigError` with one line. :func:`run_checks` runs them in order.

Why plain functions over values: what MacDrop can or cannot do exactly (trained rows, FSDP variants,
ZeRO-3 variants, quantization, DoRA at p0 = 1, PiSSA, epoch curricula, the model's own ranges, a
resumed locator file) is knowledge about MacDrop, not about LLaMA-Factory; the seam
(:mod:`.lf.arguments`) only reads LLaMA-Factory's arguments, with LLaMA-Factory's own parser.
Nothing here imports LLaMA-Factory.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Mapping, Optional

from ..core.values import parse_flag
from .keys import MacDropConfig, MacDropConfigError
from .run_args import RunArgs

#: stages MacDrop wraps (plugin/lf/patches.py swaps their trainer classes)
SUPPORTED_STAGES = ("sft", "pt", "dpo")
UNSUPPORTED_STAGE_REASON = {
    "rm": "the reward model's value head training is not what MacDrop was defined for",
    "ppo": "PPO's rollouts and value model are outside Algorithm 1",
    "kto": "MacDrop is not implemented for KTO's trainer",
}


def check_stage(args: RunArgs, config: MacDropConfig) -> None:
    if args.stage not in SUPPORTED_STAGES:
        reason = UNSUPPORTED_STAGE_REASON.get(args.stage, "unknown stage")
        raise MacDropConfigError(
            f"macdrop=true with stage={args.stage!r} is not supported ({reason}); supported stages: "
            + ", ".join(SUPPORTED_STAGES)
        )


#: the finetuning types MacDrop runs under: LoRA/DoRA (the paper's: frozen rows), and full / freeze
#: fine-tuning, whose rows the optimizer trains (kept exactly: core/masking.py, docs/how-it-works.md)
SUPPORTED_FINETUNING = ("lora", "full", "freeze")
#: module names whose ``additional_target`` entry makes LoRA train the FFN rows MacDrop masks in full
#: (peft's modules_to_save copies them): the gate/up projections of every layout core/architectures.py knows
FFN_ROW_MODULES = (
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "c_fc",
    "fc1",
    "dense_h_to_4h",
    "w1",
    "w3",
    "experts",
    "mlp",
    "feed_forward",
    "block_sparse_moe",
)


def check_finetuning(args: RunArgs, config: MacDropConfig) -> None:
    if args.finetuning_type not in SUPPORTED_FINETUNING:
        raise MacDropConfigError(
            f"macdrop=true with finetuning_type={args.finetuning_type!r} is not supported: use "
            + ", ".join(SUPPORTED_FINETUNING)
            + " (MacDrop masks the base layer under LoRA/DoRA adapters, or the trained weights themselves)"
        )
    for key in args.bypasses_trainer:
        raise MacDropConfigError(f"macdrop=true with {key}=true is not supported (that path bypasses the HF trainer)")


def trainable_rows_refusal(names, where: str) -> str:
    """The one line for trainable rows under a set-up whose optimizer step MacDrop cannot keep."""
    return (
        f"macdrop=true with {where} is not supported when the masked rows are trained ({', '.join(names)}): the "
        "optimizer steps inside the masked span there (or on a copy MacDrop does not see), so MacDrop could not keep "
        "their update exactly; train them with plain DDP or a single process, or keep them frozen "
        "(LoRA without gate/up projections in additional_target)"
    )


def trained_rows(args: RunArgs) -> Optional[str]:
    """Why the rows MacDrop masks will be trained, where the YAML already says so (else None:
    with ``freeze`` it depends on the located layer, decided at the first step)."""
    if args.finetuning_type == "full":
        return "finetuning_type=full"
    names = [
        t for t in args.additional_target if t.split(".")[-1] in FFN_ROW_MODULES and not any(c.isdigit() for c in t)
    ]
    if args.finetuning_type == "lora" and names:
        return f"additional_target={','.join(args.additional_target)}"
    return None


def check_trainable_rows(args: RunArgs, config: MacDropConfig) -> None:
    """Trained rows need the optimizer to step after MacDrop's restore, on the very tensor it
    masked (core/masking.py). DeepSpeed steps inside the training step on its own master copy,
    FSDP and ZeRO-3 hold shards, layer-wise GaLore/APOLLO step inside backward and LOMO/AdaLomo
    fuse the update into backward: refused here when the YAML says the rows are trained, and at
    the first step (one line) when only the located layer tells (freeze fine-tuning)."""
    why = trained_rows(args)
    if why is None:
        return
    where = (
        "DeepSpeed"
        if args.deepspeed is not None
        else "FSDP"
        if args.fsdp is not None
        else args.layerwise_optimizer
        if args.layerwise_optimizer
        else f"optim={args.optim}"
        if args.optim in ("lomo", "adalomo")
        else None
    )
    if where is not None:
        raise MacDropConfigError(trainable_rows_refusal([why], where))


def check_fsdp(args: RunArgs, config: MacDropConfig) -> None:
    """FSDP variants MacDrop keeps exact (see docs/distributed.md); anything else in one line."""
    fsdp = args.fsdp
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
    if args.quantization_bit is not None:
        raise MacDropConfigError(
            f"macdrop=true with FSDP and quantization_bit={args.quantization_bit} is not "
            "supported (FSDP shards the packed 4-bit codes); use DeepSpeed ZeRO-3 or no quantization"
        )


def check_zero3_variants(args: RunArgs, config: MacDropConfig) -> None:
    """ZeRO-3 variants whose parameters live somewhere the partition edits do not reach: ZeRO++
    hierarchical partitioning (backward gathers from a secondary copy), quantized weight
    communication (gathers a quantized copy) and NVMe parameter offload (partitions swapped out)."""
    if args.zero_stage != 3:
        return
    zero = (args.deepspeed or {}).get("zero_optimization") or {}
    hpz = zero.get("zero_hpz_partition_size", 1)
    reasons = []
    if str(hpz).isdigit() and int(hpz) > 1:
        reasons.append(f"zero_hpz_partition_size={hpz} (ZeRO++ hpZ: backward gathers from a secondary partition copy)")
    if parse_flag(zero.get("zero_quantized_weights", False)):
        reasons.append("zero_quantized_weights=true (ZeRO++ qwZ: forward gathers a quantized copy)")
    if str((zero.get("offload_param") or {}).get("device", "none")).lower() == "nvme":
        reasons.append("offload_param.device=nvme (partitions are swapped out to NVMe)")
    if reasons:
        raise MacDropConfigError(
            "macdrop=true with DeepSpeed ZeRO-3 " + "; ".join(reasons) + " is not supported: MacDrop edits each "
            "rank's own partition, which that copy bypasses; use plain ZeRO-3 (ds_z3_config.json) or ZeRO-2"
        )


def check_quantization(args: RunArgs, config: MacDropConfig) -> None:
    """Quantized set-ups MacDrop cannot mask exactly, in one line before the model loads: on-the-fly
    quantization other than bitsandbytes 4-bit, 4-bit under ZeRO-3, and checkpoints that are
    already quantized (read from a local model folder's config.json, see :mod:`.prequantized`)."""
    from .prequantized import checkpoint_quantization, unsupported_checkpoint_reason

    model = args.model_name_or_path
    quantization = checkpoint_quantization(model, args.cache_dir, args.model_revision) if model else None
    if quantization is not None:  # LLaMA-Factory then ignores quantization_bit
        reason = unsupported_checkpoint_reason(quantization)
        if reason:
            raise MacDropConfigError(
                f"macdrop=true with model_name_or_path={model}, a checkpoint quantized with quant_method="
                f"{quantization.get('quant_method')} (its config.json), is not supported: {reason}"
            )
        return
    bit = args.quantization_bit
    if bit is None:
        return
    if args.quantization_method != "bnb":
        raise MacDropConfigError(
            f"macdrop=true with quantization_method={args.quantization_method} (quantization_bit={bit}) is not "
            "supported: its layers store packed codes MacDrop cannot mask exactly; use quantization_method: bnb with "
            "quantization_bit: 4"
        )
    if bit == 8:
        raise MacDropConfigError(
            "macdrop=true with quantization_bit=8 is not supported: MacDrop masks bitsandbytes 4-bit weights "
            "(quantization_bit: 4, QLoRA) exactly, not 8-bit LLM.int8 ones; use quantization_bit: 4 or none"
        )
    if bit != 4 or isinstance(bit, bool):
        raise MacDropConfigError(
            f"quantization_bit={bit!r} is not allowed with quantization_method: bnb: LLaMA-Factory quantizes with "
            "bitsandbytes only at 4 or 8 (the integer), and would load this model unquantized; MacDrop supports "
            "quantization_bit: 4, or none"
        )
    if args.zero_stage == 3:
        raise MacDropConfigError(
            "macdrop=true with quantization_bit=4 and DeepSpeed ZeRO-3 is not supported (ZeRO-3 partitions the "
            "packed 4-bit codes, which the 4-bit backend does not address); use ZeRO-2, or no quantization"
        )


def check_dora(args: RunArgs, config: MacDropConfig) -> None:
    """DoRA divides each row by its norm: p0 = 1 can zero a whole row (every curriculum) -> NaN."""
    if args.use_dora and config.macdrop_p0 >= 1.0:
        raise MacDropConfigError(
            f"macdrop_p0={config.macdrop_p0} with use_dora=true is not supported: near p = 1 (the first steps of every "
            "curriculum at p0 = 1) whole rows get dropped, DoRA's row norm becomes 0 and every loss NaN; use macdrop_p0 < 1"
        )


def check_pissa(args: RunArgs, config: MacDropConfig) -> None:
    """PiSSA rewrites the base weights (W - principal part) before training: not the rows the probe should see."""
    if args.pissa_init:
        raise MacDropConfigError(
            "macdrop=true with pissa_init=true is not supported: PiSSA moves the principal part of every base weight "
            "into the adapter, so the frozen rows MacDrop would locate and drop are no longer the pre-trained ones; "
            "use pissa_init: false"
        )


def check_epoch_curriculum(args: RunArgs, config: MacDropConfig) -> None:
    """Epoch curricula need several epochs; refuse where the YAML already decides they cannot have them.

    With ``max_steps`` the epoch count depends on the dataset size: the trainer checks it at set-up.
    """
    from ..core.curriculum import epoch_curriculum_problem

    if config.macdrop_curriculum not in ("epoch_before", "epoch_after"):
        return
    if args.streaming:
        epochs = sys.maxsize
    elif args.max_steps > 0:
        return
    else:
        epochs = math.ceil(args.num_train_epochs)
    problem = epoch_curriculum_problem(config.macdrop_curriculum, epochs)
    if problem is not None:
        raise MacDropConfigError(
            f"macdrop_curriculum={config.macdrop_curriculum!r} cannot mean what the paper means here: {problem}; "
            "use macdrop_curriculum: step, exp or constant, or train several epochs"
        )


def check_model_ranges(args: RunArgs, config: MacDropConfig) -> None:
    """What the model's config.json already refuses, before the model (and the data) load
    (:func:`check_model_config`, on the file LLaMA-Factory will load). ``macdrop_probe_token`` is
    not compared with ``vocab_size`` when LLaMA-Factory grows the vocabulary (``add_tokens``,
    ``add_special_tokens``, ``resize_vocab``, ...)."""
    from ..core.model_config import read_config_json

    found = (
        read_config_json(args.model_name_or_path, args.cache_dir, args.model_revision)
        if args.model_name_or_path
        else None
    )
    if found is None:
        return
    path, full = found
    check_model_config(full, config, path, grows_vocabulary=args.grows_vocabulary)


def check_model_config(
    full: dict, config: MacDropConfig, path: str, grows_vocabulary: bool = False, vocab: Optional[int] = None
) -> None:
    """The ``macdrop_*`` keys against a model's config.json (``full``, read from ``path``), for every host.

    ``macdrop_layer``: ``num_hidden_layers`` (GPT-2: ``n_layer``). ``macdrop_indices``:
    ``intermediate_size`` (the width of W_up; Phi-3's fused gate_up_proj holds two halves of that
    size), OPT's ``ffn_dim``, GPT-2's ``n_inner``; skipped for MoE configs, whose expert widths have
    their own keys. ``macdrop_k``: the widest FFN any width key names (``ffn_widths``: dense,
    expert and shared-expert widths, a per-layer list by its widest entry), so no layer can hold k
    rows. ``macdrop_probe_token`` (an id): ``vocab`` where the host knows the live vocabulary (its
    embedding rows), else config.json's ``vocab_size`` unless ``grows_vocabulary``. A multimodal
    config is read in its ``text_config``. Anything not decided here is checked on the loaded
    model at the first step.
    """
    from ..core.model_config import decoder_config, ffn_widths, is_moe, vocab_size

    cfg = decoder_config(full)
    token = config.macdrop_probe_token
    if vocab is None and not grows_vocabulary:
        vocab = vocab_size(full)
    if isinstance(token, int) and vocab is not None and token >= vocab:
        raise MacDropConfigError(
            f"macdrop_probe_token={token} is outside the vocabulary: {path} has vocab_size {vocab} (token ids 0..{vocab - 1})"
        )
    widths = ffn_widths(full)
    if config.macdrop_indices is None and widths and config.macdrop_k > max(widths.values()):
        key, width = max(widths.items(), key=lambda kv: kv[1])
        raise MacDropConfigError(
            f"macdrop_k={config.macdrop_k} is out of range: {path} has {key} {width} (allowed 1..{width})"
        )
    n_rows = len(config.macdrop_indices) if config.macdrop_indices is not None else config.macdrop_k
    if config.macdrop_scope == "non_massive" and widths and n_rows >= max(widths.values()):
        key, width = max(widths.items(), key=lambda kv: kv[1])
        given = (
            f"macdrop_indices ({n_rows} rows)"
            if config.macdrop_indices is not None
            else f"macdrop_k={config.macdrop_k}"
        )
        raise MacDropConfigError(
            f"macdrop_scope='non_massive' with {given} leaves no row to drop: {path} has {key} {width}, and "
            f"non_massive drops every row but the {n_rows} massive ones; use fewer than {width} rows, or another scope"
        )
    layers = next((cfg[k] for k in ("num_hidden_layers", "n_layer") if isinstance(cfg.get(k), int)), None)
    if config.macdrop_layer is not None and layers is not None and config.macdrop_layer >= layers:
        raise MacDropConfigError(
            f"macdrop_layer={config.macdrop_layer} is out of range: {path} has {layers} layers (0..{layers - 1})"
        )
    if config.macdrop_indices is None or is_moe(cfg):
        return
    width = next((cfg[k] for k in ("intermediate_size", "ffn_dim", "n_inner") if isinstance(cfg.get(k), int)), None)
    bad = [i for i in config.macdrop_indices if width is not None and i >= width]
    if bad:
        raise MacDropConfigError(
            f"macdrop_indices={list(config.macdrop_indices)}: {bad} outside 0..{width - 1} "
            f"(intermediate size {width} in {path})"
        )


def check_resumed_locator_file(args: RunArgs, config: MacDropConfig) -> None:
    """A run resumed from a checkpoint reuses ``output_dir/macdrop_locator.json``: a file that is
    not one (truncated, not JSON, not an object, ...) is refused before the model loads, with the
    same line the trainer would print at the first step, and so is a file written for another model
    folder (or hub id) than this run's (:func:`~..core.locator.files.model_differs`: the same
    folder written differently is the same model). Whether it fits the loaded model is checked there."""
    from ..core.locator import LOCATOR_FILE, LocatorError, read_resumed_locator_file
    from ..core.locator.files import model_differs

    if not args.output_dir or not args.resumes:
        return
    path = os.path.join(args.output_dir, LOCATOR_FILE)
    if os.path.isfile(path):
        try:
            result = read_resumed_locator_file(path)
        except LocatorError as err:
            raise MacDropConfigError(str(err)) from None
        model = args.model_name_or_path
        if model and model_differs(result.model, model):  # the line the first step would print, before load
            raise MacDropConfigError(
                f"{path} was written for model {result.model!r}, this run trains {model!r}: delete {path} to locate again"
            )


#: LLaMA-Factory's environment switches whose code paths never build the trainer classes MacDrop
#: extends (plugin/lf/patches.py): a MacDrop run there would train without it
SKIPPING_SWITCHES = {
    "USE_V1": "LLaMA-Factory's v1 trainers (their own loop, whose callbacks only observe and come from LLaMA-Factory)",
    "USE_MCA": "the mcore_adapter (Megatron-Core) trainers (LLaMA-Factory sets use_mca from this variable, "
    "whatever the YAML says)",
    "USE_MEGATRON_BRIDGE": "the Megatron-Bridge trainers",
}


def check_skipping_switches(enabled: Mapping[str, str]) -> None:
    """``enabled``: the :data:`SKIPPING_SWITCHES` set in this environment (LLaMA-Factory's reading)
    and their values."""
    for name, value in enabled.items():
        raise MacDropConfigError(
            f"macdrop=true with {name}={value} is not supported: that path runs {SKIPPING_SWITCHES[name]}, which never "
            f"get MacDrop; unset {name}, or remove macdrop: true"
        )


#: in the order a user meets them: what the run is, how it is distributed, what the weights are
CHECKS = (
    check_stage,
    check_finetuning,
    check_trainable_rows,
    check_fsdp,
    check_zero3_variants,
    check_quantization,
    check_dora,
    check_pissa,
    check_epoch_curriculum,
    check_model_ranges,
    check_resumed_locator_file,
)


def run_checks(args: RunArgs, config: MacDropConfig) -> None:
    for check in CHECKS:
        check(args, config)
