"""THE sweep loop for every in-place edit of a loaded model: apply a setting, evaluate, undo, verify.

Why one loop: an attack sweep (``macdrop attack``), a quantization sweep (``macdrop quantize``)
and the one-base evaluation of ``macdrop compare`` all do the same thing: for every setting, edit
the weights the evaluators already hold, evaluate every prepared corpus (perplexity) and, if asked,
lm-eval's zero-shot and generation tasks, undo the edit, and at the end check that every touched
weight is back bit for bit. :func:`evaluate_settings` is that loop, over anything that implements
:class:`InPlaceEdit` (``applied(setting)`` as a context manager that always undoes, and
``verify_restored()``): :class:`~..attack.attacks.ModelAttacker` and
:class:`~..quantize.quantizer.ModelQuantizer`. Each caller turns the results into its own shape
through one callback (rows for a report, per-item results for paired statistics).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

from torch import nn

from ...core.text_prefix import TextPrefix
from ..evaluate.perplexity import PerplexityProtocol, TextSource, Windows, evaluate_perplexity, make_windows, tokenize


@dataclass
class PreparedCorpus:
    """A corpus tokenized and cut into windows once, evaluated under every setting.

    ``protocol`` is the resolved one (``bos`` = the placement used) and ``prefix`` the tokens put
    there (:func:`~.perplexity.resolve_protocol`); ``source.protocol`` is what was asked."""

    source: TextSource
    windows: Windows
    protocol_used: Optional[PerplexityProtocol] = None
    prefix: Optional[TextPrefix] = None

    def protocol(self) -> dict[str, Any]:
        used = self.protocol_used or self.source.protocol
        out = {
            "dataset": self.source.name,
            "origin": self.source.origin,
            **used.to_dict(),
            "bos_requested": self.source.protocol.bos,
        }
        if self.prefix is not None:
            out.update(self.prefix.protocol())
        return {**out, "windows": self.windows.count, "predicted_tokens": self.windows.predicted_tokens}


def prepare_corpus(
    source: TextSource, tokenizer: Any, protocol: PerplexityProtocol, prefix: TextPrefix
) -> PreparedCorpus:
    """``source`` tokenized once (no special tokens) and cut into ``protocol``'s windows with ``prefix``
    (both from :func:`~.perplexity.resolve_protocol`)."""
    windows = make_windows(tokenize(tokenizer, source.text), protocol, prefix.token_ids)
    return PreparedCorpus(source, windows, protocol, prefix)


class InPlaceEdit(Protocol):
    """What a sweep needs of an edit: apply one setting for a block (undone on exit, errors too)
    and check at the end that every weight it may touch is back bit for bit."""

    def applied(self, setting: Any) -> AbstractContextManager[None]: ...

    def verify_restored(self) -> None: ...


def evaluate_settings(
    model: nn.Module,
    editor: InPlaceEdit,
    settings: Sequence[Any],
    corpora: Sequence[PreparedCorpus] = (),
    zeroshot=None,
    *,
    on_result: Callable[[Any, str, Any], None],
    label: Callable[[Any], str] = lambda s: s.label,
    batch_size: int = 1,
    progress: bool = True,
    per_item: bool = False,
    zeroshot_for: Callable[[Any], bool] = lambda s: True,
    generation=None,
    generation_for: Callable[[Any], bool] = lambda s: True,
    echo: Optional[Callable[[str], None]] = None,
    resumed: Callable[[Any], bool] = lambda s: False,
    finished: Callable[[Any], None] = lambda s: None,
) -> None:
    """THE sweep: for every setting, ``editor.applied(setting)``, every corpus's perplexity, (where
    ``zeroshot_for(setting)``) the zero-shot tasks and (where ``generation_for(setting)``) the
    generation tasks, each result handed to ``on_result(setting, dataset, result)`` as it comes in
    (a :class:`~..evaluate.perplexity.PerplexityResult`, a :class:`~..evaluate.zeroshot.ZeroShotResult`
    or a :class:`~..evaluate.gen_tasks.GenTaskResult`); undone after each setting, verified bit for
    bit at the end.

    ``per_item``: per-window NLLs and per-document scores too (paired statistics); generation
    results always carry their items. ``generation``: a :class:`~..evaluate.gen_tasks.GenerationSuite`;
    ``echo`` gets its progress lines. ``resumed(setting)`` True skips a setting whose results the
    caller already has (a checkpoint); ``finished(setting)`` is called after each evaluated one."""
    for setting in settings:
        if resumed(setting):
            continue
        with editor.applied(setting):
            for corpus in corpora:
                res = evaluate_perplexity(
                    model,
                    corpus.windows,
                    f"{label(setting)} / {corpus.source.name}",
                    batch_size=batch_size,
                    progress=progress,
                    per_window=per_item,
                )
                on_result(setting, corpus.source.name, res)
            if zeroshot is not None and zeroshot_for(setting):
                for res in zeroshot.evaluate(per_item=per_item) if per_item else zeroshot.evaluate():
                    on_result(setting, res.task, res)
            if generation is not None and generation_for(setting):
                for res in generation.evaluate(label(setting), echo=echo):
                    on_result(setting, res.task, res)
        finished(setting)
    editor.verify_restored()
