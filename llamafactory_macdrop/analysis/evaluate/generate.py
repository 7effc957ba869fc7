"""What one loaded model answers to many prompts: greedy decoding, batched, stop strings, turns.

Greedy is what ``attack --generate`` defines (analysis/generation.py): at every step the arg-max
of the last position's logits, until an end token (:func:`~..generation.end_tokens`: the
tokenizer's EOS and the model's ``generation_config.eos_token_id``) or ``max_new_tokens``. Here
many prompts go through the model together:

* the prompts are sorted by length (longest first, ties in input order) and cut into batches of
  ``batch_size``, so that a batch pads little and the first batch shows the memory peak;
* left padding: the pad positions are masked (``attention_mask`` 0) and every real token keeps the
  position it has alone (``position_ids`` = number of real tokens before it), so a row sees what
  it would see alone; the KV cache carries the prompt, and only the last position's logits are
  computed (``logits_to_keep=1``: a 900-token prompt's full logits would be 900 x vocab floats);
* every row stops on its own: an end token, its own ``max_new_tokens``, or one of its stop
  strings appearing in its decoded text (checked after every token; the text is cut before the
  earliest stop string, the tokens keep the one that completed it). A finished row leaves the
  batch: its rows of the KV cache are dropped (``Cache.batch_select_indices``), so it costs no
  compute afterwards; with a cache that lacks that method it stays, fed a pad, its output unused.

Which text the model sees (:func:`encode_conversation`): the chat template when the tokenizer has
one and ``chat_template`` is on (one user turn plus the generation prompt: the same ids as
:func:`~..generation.prompt_ids`); otherwise what the tokenizer itself puts before a text
(core/text_prefix.py) + the text's tokens, no EOS appended. Every result says which
(``chat_template``).

A request may be a conversation: a list of user turns, answered one after another, each turn's
prompt being the conversation so far with the model's OWN earlier answers (the text it produced,
cut at the stop string) as the assistant turns. All first turns of a call run first (batched),
then all second turns, and so on. Without a chat template the conversation is the plain text
``turn 1 + answer 1 + "\\n\\n" + turn 2 + ...`` (the answer continues its prompt's text, as it
was generated). A ``system`` text is the chat's system message (folded into the first user turn,
after a blank line, where the template refuses a system role) or, without a template, the text
before the first turn, followed by a blank line.

Batched equals one by one: on the test models (fp32, CPU) the tokens are those of
:func:`~..generation.greedy_generate` on each prompt alone (tests/analysis/evaluate/). On a real
model they can differ: a padded batch runs the matmuls with other shapes and the attention over
more (masked, exactly zero) keys, so logits differ in the last bits, and where the two best
tokens are that close the arg-max flips and the rest of the text differs. Measured on
SmolLM2-135M-Instruct, fp32, CPU, batch 16, chat template, no stop strings
(benchmarks/generation.py, results in benchmarks/results/cpu_generation_*.json): 0 of 176 items
differ (nq_open 96 x 50 tokens, squad 48 x 50, gsm8k 32 x 256; 8,770 generated tokens), so the
rate is below about 1.7 % of items (95 % upper bound for 0/176); the rate is not zero in
principle, and bf16 or a GPU kernel can flip more often.

Speed (same benchmark, 2 CPU cores): batched at 16 vs one by one is 7.7x on the tiny planted
Llama and 5.9x on SmolLM2 for gsm8k (256-token answers); for short answers (nq_open, <= 32
tokens) 3.2-3.5x, because the prompt's forward pass, the same compute in both arms, is then a
third of the batched time.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ...core.probing import unwrap_peft
from ...core.text_prefix import TextPrefix, resolve_prefix
from ...errors import MacDropError
from ..attack.generation import end_tokens

STOPPED = ("eos", "stop", "max_new_tokens")


class GenerationError(MacDropError, ValueError):
    """A request that cannot be generated (one line naming the request and what is allowed)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One item to answer: one prompt (``turns`` of length 1) or a conversation of user turns."""

    id: str
    turns: tuple[str, ...]
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    system: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "turns", (self.turns,) if isinstance(self.turns, str) else tuple(self.turns))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not self.turns or not all(isinstance(t, str) for t in self.turns):
            raise GenerationError(f"request {self.id!r}: turns must be one or more strings")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(
                f"request {self.id!r}: max_new_tokens {self.max_new_tokens!r} is not allowed (an integer >= 1)"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError(
                f"request {self.id!r}: stop strings must be non-empty strings, got {list(self.stop)!r}"
            )


@dataclass(frozen=True)
class TurnOutput:
    """The answer to one turn."""

    text: str  # decoded without end tokens and special tokens, cut before the stop string
    token_ids: tuple[int, ...]  # the new tokens (an end token, or the token completing a stop string, included)
    stopped: str  # eos | stop | max_new_tokens
    prompt_tokens: int
    stop_string: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "new_tokens": len(self.token_ids),
            "stopped": self.stopped,
            "stop_string": self.stop_string,
            "prompt_tokens": self.prompt_tokens,
        }


@dataclass(frozen=True)
class GenerationResult:
    """A request's answers, one per turn, and whether the chat template was applied."""

    id: str
    turns: tuple[TurnOutput, ...]
    chat_template: bool

    @property
    def text(self) -> str:
        """The last turn's answer (the only one for a single prompt)."""
        return self.turns[-1].text

    @property
    def new_tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.turns)


@dataclass(frozen=True)
class GenerationProgress:
    """Where a call stands after a batch: prompts (turns) answered of all, tokens generated, time."""

    done: int
    total: int
    new_tokens: int
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.done}/{self.total} prompts, {self.new_tokens} new tokens, {self.seconds:.1f} s "
            f"({self.items_per_s:.2f} prompts/s, {self.tokens_per_s:.1f} tokens/s)"
        )


def _ids(encoded: Any) -> list[int]:
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if encoded and isinstance(encoded[0], (list, tuple)):
        encoded = encoded[0]
    return [int(i) for i in encoded]


def uses_chat_template(tokenizer: Any, chat_template: bool = True) -> bool:
    """Whether prompts go through the chat template: asked for and the tokenizer has one."""
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def _messages(turns: Sequence[str], answers: Sequence[str], system: Optional[str], fold_system: bool) -> list[dict]:
    messages = []
    for i, turn in enumerate(turns):
        if i == 0 and system and fold_system:
            turn = f"{system}\n\n{turn}"
        messages.append({"role": "user", "content": turn})
        if i < len(turns) - 1:
            messages.append({"role": "assistant", "content": answers[i]})
    if system and not fold_system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def encode_conversation(
    tokenizer: Any,
    turns: Sequence[str],
    answers: Sequence[str] = (),
    *,
    system: Optional[str] = None,
    chat_template: bool = True,
    prefix: Optional[TextPrefix] = None,
) -> tuple[list[int], bool]:
    """The ids of the prompt for the last of ``turns``, the earlier turns answered by ``answers``
    (one fewer than turns), and whether the chat template was applied (see the module docstring).
    ``prefix``: the tokenizer's own prefix, resolved once by the caller (found here when None)."""
    turns = [turns] if isinstance(turns, str) else list(turns)
    if len(answers) != len(turns) - 1:
        raise GenerationError(f"{len(turns)} turns need {len(turns) - 1} earlier answers, got {len(answers)}")
    if uses_chat_template(tokenizer, chat_template):
        try:
            encoded = tokenizer.apply_chat_template(
                _messages(turns, answers, system, False), add_generation_prompt=True, tokenize=True
            )
        except Exception:  # noqa: BLE001 - a template that refuses a system role (Mistral's, Gemma's)
            if not system:
                raise
            encoded = tokenizer.apply_chat_template(
                _messages(turns, answers, system, True), add_generation_prompt=True, tokenize=True
            )
        return _ids(encoded), True
    parts = [f"{system}\n\n"] if system else []
    for i, turn in enumerate(turns):
        parts.append(turn)
        if i < len(turns) - 1:
            parts += [answers[i], "\n\n"]
    prefix = prefix if prefix is not None else resolve_prefix(tokenizer)
    return prefix.apply(tokenizer("".join(parts), add_special_tokens=False)["input_ids"]), False


@dataclass
class _Job:
    """One prompt in flight: which request and turn, its ids, limits, and what it produced."""

    request: int
    ids: list[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    new: list[int] = field(default_factory=list)
    stopped: Optional[str] = None
    text: Optional[str] = None
    stop_string: Optional[str] = None


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(unwrap_peft(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _device(model: nn.Module) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except Exception:  # noqa: BLE001
        return next(model.parameters()).device


class BatchedGenerator:
    """Greedy answers of ``model`` to :class:`GenerationRequest` s, ``batch_size`` prompts at a time.

    ``end``: the ids that end an answer (default :func:`~..generation.end_tokens`). ``prefix``:
    what goes before a text when no chat template is applied (default: the tokenizer's own,
    core/text_prefix.py). ``prune``: drop finished rows from the batch (and the KV cache); off,
    they stay, fed a pad (the same tokens; for comparison). ``max_batch_tokens``: a cap on rows x
    (longest prompt + budget) per batch, so long prompts (the needle, LongBench) batch by length
    and the memory peak stays bounded. The model is put in eval mode during
    a call and its flag restored.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        chat_template: bool = True,
        end: Optional[set[int]] = None,
        prefix: Optional[TextPrefix] = None,
        prune: bool = True,
        max_batch_tokens: Optional[int] = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GenerationError(f"batch_size {batch_size!r} is not allowed (an integer >= 1)")
        if max_batch_tokens is not None and (
            isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1
        ):
            raise GenerationError(f"max_batch_tokens {max_batch_tokens!r} is not allowed (an integer >= 1)")
        self.max_batch_tokens = max_batch_tokens
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.chat_template = uses_chat_template(tokenizer, chat_template)
        self.end = set(end) if end is not None else end_tokens(model, tokenizer)
        self.prefix = prefix if prefix is not None else (None if self.chat_template else resolve_prefix(tokenizer))
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = min(self.end) if self.end else 0
        self.pad_id = int(pad)  # any id does: pad positions are masked
        self._keep_logits = _accepts(model, "logits_to_keep")
        self.prune = prune

    # ------------------------------------------------------------------------- public
    def encode(self, turns: Sequence[str], answers: Sequence[str] = (), system: Optional[str] = None) -> list[int]:
        return encode_conversation(
            self.tokenizer, turns, answers, system=system, chat_template=self.chat_template, prefix=self.prefix
        )[0]

    def generate(
        self, requests: Sequence[GenerationRequest], progress: Optional[Callable[[GenerationProgress], None]] = None
    ) -> list[GenerationResult]:
        """The results in the order of ``requests``; ``progress`` is called after every batch."""
        requests = list(requests)
        answers: list[list[TurnOutput]] = [[] for _ in requests]
        total = sum(len(r.turns) for r in requests)
        clock, done, tokens = time.perf_counter(), 0, 0
        for turn in range(max((len(r.turns) for r in requests), default=0)):
            jobs = [
                _Job(
                    i,
                    self.encode(r.turns[: turn + 1], [a.text for a in answers[i]], r.system),
                    r.max_new_tokens,
                    r.stop,
                )
                for i, r in enumerate(requests)
                if len(r.turns) > turn
            ]
            order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j].ids))  # stable: ties keep input order
            for batch in self._batches([jobs[j] for j in order]):
                self._decode(batch)
                for job in batch:
                    answers[job.request].append(self._output(job))
                    tokens += len(job.new)
                done += len(batch)
                if progress:
                    progress(GenerationProgress(done, total, tokens, time.perf_counter() - clock))
        return [GenerationResult(r.id, tuple(a), self.chat_template) for r, a in zip(requests, answers)]

    def _batches(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Jobs (longest prompt first) cut into batches of at most ``batch_size`` rows and, with
        ``max_batch_tokens``, at most that many padded tokens (prompt + budget) per batch: long
        prompts go fewer at a time, a single one always goes."""
        out: list[list[_Job]] = []
        for job in jobs:
            batch = out[-1] if out else None
            if batch is not None and len(batch) < self.batch_size:
                width = len(batch[0].ids) + max(j.max_new_tokens for j in (*batch, job))
                if self.max_batch_tokens is None or (len(batch) + 1) * width <= self.max_batch_tokens:
                    batch.append(job)
                    continue
            out.append([job])
        return out

    # ------------------------------------------------------------------------- decoding
    def _text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.end], skip_special_tokens=True)

    def _finish(self, job: _Job, token: int) -> bool:
        """Append ``token``; True when the job is done (and why is recorded)."""
        job.new.append(token)
        if token in self.end:
            job.stopped = "eos"
            return True
        if job.stop:
            text = self._text(job.new)
            found = [(text.find(s), s) for s in job.stop if s in text]
            if found:
                at, string = min(found)
                job.stopped, job.text, job.stop_string = "stop", text[:at], string
                return True
        if len(job.new) >= job.max_new_tokens:
            job.stopped = "max_new_tokens"
            return True
        return False

    def _output(self, job: _Job) -> TurnOutput:
        text = job.text if job.text is not None else self._text(job.new)
        return TurnOutput(text, tuple(job.new), job.stopped, len(job.ids), job.stop_string)

    def _forward(self, **kwargs):
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        return self.model(use_cache=True, **kwargs)

    @torch.no_grad()
    def _decode(self, jobs: list[_Job]) -> None:
        device = _device(self.model)
        width = max(len(j.ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.ids) :] = torch.tensor(job.ids, dtype=torch.long)
            mask[row, width - len(job.ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions)
            cache = out.past_key_values
            prunable = self.prune and hasattr(cache, "batch_select_indices")
            rows: list[Optional[int]] = list(range(len(jobs)))  # batch row -> job (None: finished, kept)
            next_position = positions[:, -1:] + 1
            while True:
                chosen = out.logits[:, -1].argmax(-1).tolist()
                for row, job in enumerate(rows):
                    if job is not None and self._finish(jobs[job], int(chosen[row])):
                        rows[row] = None
                if all(job is None for job in rows):
                    return
                if prunable and None in rows:
                    keep = [row for row, job in enumerate(rows) if job is not None]
                    select = torch.tensor(keep, device=device)
                    cache.batch_select_indices(select)
                    mask, next_position = mask[select], next_position[select]
                    chosen, rows = [chosen[r] for r in keep], [rows[r] for r in keep]
                step = torch.tensor(
                    [[t if job is not None else self.pad_id] for t, job in zip(chosen, rows)], device=device
                )
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
                out = self._forward(
                    input_ids=step, attention_mask=mask, position_ids=next_position, past_key_values=cache
                )
                next_position = next_position + 1
        finally:
            self.model.train(was_training)


def generate_batched(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    *,
    batch_size: int = 16,
    chat_template: bool = True,
    progress: Optional[Callable[[GenerationProgress], None]] = None,
) -> list[GenerationResult]:
    """:meth:`BatchedGenerator.generate` in one call."""
    return BatchedGenerator(model, tokenizer, batch_size=batch_size, chat_template=chat_template).generate(
        requests, progress
    )
