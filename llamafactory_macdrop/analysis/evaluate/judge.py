"""A judge that grades answers 1-5 in Prometheus-2's absolute-grading (direct assessment) format.

Why this format: the judge models (Prometheus-2-7B / 8x7B, M-Prometheus, Flow-Judge, Selene-1-Mini)
were trained on it, so a prompt keeps its structure: a task description (feedback strictly on the
rubric, then "[RESULT] n"), ``###The instruction to evaluate:``, ``###Response to evaluate:``,
``###Reference Answer (Score 5):`` (when there is one), ``###Score Rubrics:`` and ``###Feedback:``
where the judge continues. The wording is this module's own (``prometheus-eval`` holds the original
templates but pulls in litellm). A system message asks for a fair judgement (a chat template that
refuses a system role gets none: lm-eval's ``apply_chat_template`` drops it). One rubric per kind
of item (:data:`RUBRICS`: ``math``, ``short_qa``, ``context_qa``, ``open``).

A conversation is judged turn by turn (the conversation so far, that turn's answer); an item's
score is the mean of its turns', ``unparsed`` when any turn's is. The score is the integer after
the LAST "[RESULT]" (a colon, brackets, "/5" or "out of 5" allowed); anything else (none, no
integer, "4.5", "4/10", outside 1..5) is unparsed with its reason, counted, never scored, never
dropped; feedback and raw text are kept per item.

Backends: :class:`LocalJudge` (a causal LM loaded once, its own dtype and device, greedy, its chat
template, on the same lm-eval HFLM bridge as every generation here: harness.py) and
:class:`URLJudge` (an OpenAI-compatible ``/v1/chat/completions`` endpoint, temperature 0, stdlib
``urllib``, one deadline per request covering connect, wait and read, so a server that trickles
bytes cannot hold a request past it). ``check()`` loads or connects, so a judge that cannot is refused before anything
generates.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from ...errors import MacDropError

SYSTEM_PROMPT = (
    "You are a fair and careful evaluator. You judge a response only by the score rubric you are given, "
    "write clear and objective feedback, and keep to absolute standards of quality."
)

TASK_DESCRIPTION = """###Task Description:
You are given an instruction (it may contain an input), a response to evaluate, {reference_note}and a score rubric with the evaluation criterion.
1. Write detailed feedback on the response, judging it only by the score rubric, not by general impressions.
2. After the feedback, give a score: an integer from 1 to 5, chosen by the rubric.
3. Write your output in this form: "Feedback: (your feedback on the criterion) [RESULT] (an integer from 1 to 5)"
4. Write nothing else: no opening, closing or further explanation."""

REFERENCE_NOTE = "a reference answer that would receive a score of 5, "


@dataclass(frozen=True)
class Rubric:
    """A criterion and what each score 1..5 means."""

    criterion: str
    scores: tuple[str, str, str, str, str]

    def text(self) -> str:
        return "\n".join([f"[{self.criterion}]", *(f"Score {i}: {d}" for i, d in enumerate(self.scores, 1))])


RUBRICS: dict[str, Rubric] = {
    "math": Rubric(
        "Does the response solve the math problem correctly, reaching the right final number through sound reasoning?",
        (
            "The final answer is wrong or missing, and the reasoning is absent, irrelevant or nonsensical.",
            "The final answer is wrong; some steps are relevant but the reasoning has major errors.",
            "The reasoning is partly right but the final answer is wrong or missing, or the answer is right with major "
            "gaps or errors in the reasoning.",
            "The final answer is right and the reasoning is mostly sound, with minor mistakes or unclear steps.",
            "The final answer is right and the reasoning is complete, correct and clearly explained.",
        ),
    ),
    "short_qa": Rubric(
        "Does the response answer the question correctly and concisely with the fact that was asked for?",
        (
            "The response does not answer the question, or the answer is entirely wrong.",
            "The answer is wrong but related to the question, or it is buried in irrelevant or incorrect text.",
            "The answer is partly right (incomplete, too vague or only roughly correct).",
            "The answer is right but wordy, or it adds details that are doubtful.",
            "The answer is right, precise and concise.",
        ),
    ),
    "context_qa": Rubric(
        "Does the response answer the question correctly using the information in the given background text?",
        (
            "The response does not answer the question or contradicts the background text.",
            "The answer is wrong or not supported by the background text, though related to it.",
            "The answer is partly right: it finds the relevant passage but is incomplete or imprecise.",
            "The answer is right and supported by the text, but wordy or slightly imprecise.",
            "The answer is right, supported by the background text, precise and concise.",
        ),
    ),
    "open": Rubric(
        "Does the response follow the instruction and meet the user's request helpfully, accurately and coherently?",
        (
            "The response ignores the instruction or is incoherent, irrelevant or unusable.",
            "The response addresses the instruction only in part and has major errors or omissions.",
            "The response follows the instruction with noticeable errors, omissions or lack of clarity.",
            "The response follows the instruction well and is accurate and clear, with minor shortcomings.",
            "The response follows the instruction fully and is accurate, clear, well organized and helpful.",
        ),
    ),
}


class JudgeError(MacDropError, RuntimeError):
    """A judge that cannot load, connect or answer (one line)."""


def judge_prompt(instruction: str, response: str, rubric: Rubric, reference: Optional[str] = None) -> str:
    """The absolute-grading prompt (see the module docstring); ends where the judge continues."""
    parts = [
        TASK_DESCRIPTION.format(reference_note=REFERENCE_NOTE if reference else ""),
        f"###The instruction to evaluate:\n{instruction}",
        f"###Response to evaluate:\n{response}",
    ]
    if reference:
        parts.append(f"###Reference Answer (Score 5):\n{reference}")
    parts += [f"###Score Rubrics:\n{rubric.text()}", "###Feedback: "]
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- parsing
_RESULT = re.compile(r"\[\s*RESULT\s*\]", re.IGNORECASE)
_SCORE = re.compile(r"\s*:?\s*[(\[]?\s*(-?\d+(?:[.,]\d+)?)\s*[)\]]?(?:\s*(?:/|out\s+of)\s*(\d+))?", re.IGNORECASE)
_FEEDBACK = re.compile(r"^\s*(?:###\s*)?Feedback\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Judgement:
    """A judge's answer: the score 1..5 or None (then ``unparsed`` says why), feedback, raw text."""

    score: Optional[int]
    feedback: str
    raw: str
    unparsed: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "feedback": self.feedback, "raw": self.raw, "unparsed": self.unparsed}


def parse_judgement(text: str) -> Judgement:
    """The score after the last "[RESULT]" (rule in the module docstring)."""
    text = text or ""
    marks = list(_RESULT.finditer(text))
    if not marks:
        return Judgement(None, _FEEDBACK.sub("", text).strip(), text, "no [RESULT]")
    last = marks[-1]
    feedback = _FEEDBACK.sub("", text[: last.start()]).strip()
    found = _SCORE.match(text, last.end())
    if not found:
        return Judgement(None, feedback, text, "no integer after the last [RESULT]")
    value, scale = found.group(1), found.group(2)
    if not re.fullmatch(r"-?\d+", value):
        return Judgement(None, feedback, text, f"not an integer: {value}")
    if scale is not None and scale != "5":
        return Judgement(None, feedback, text, f"a score out of {scale}, not out of 5")
    score = int(value)
    if not 1 <= score <= 5:
        return Judgement(None, feedback, text, f"out of range: {score} (1..5)")
    return Judgement(score, feedback, text)


# ----------------------------------------------------------------------------- what is judged
@dataclass(frozen=True)
class JudgeRequest:
    """One answer to grade: the item and turn, the rubric's kind, and the texts."""

    id: str
    turn: int
    kind: str
    instruction: str
    response: str
    reference: Optional[str] = None

    def prompt(self) -> tuple[str, str]:
        """(system, user) messages."""
        rubric = RUBRICS.get(self.kind, RUBRICS["open"])
        return SYSTEM_PROMPT, judge_prompt(self.instruction, self.response, rubric, self.reference)


def _conversation(turns: Sequence[str], answers: Sequence[str]) -> str:
    if len(turns) == 1:
        return turns[0]
    lines = []
    for i, turn in enumerate(turns):
        lines.append(f"User: {turn}")
        if i < len(turns) - 1:
            lines.append(f"Assistant: {answers[i]}")
    return "\n\n".join(lines) + "\n\n(Evaluate the assistant's answer to the last user turn.)"


def judge_requests(
    item_id: str, kind: str, turns: Sequence[str], answers: Sequence[str], references: Sequence[Optional[str]] = ()
) -> list[JudgeRequest]:
    """One request per turn of an item: the conversation so far, that turn's answer, its reference."""
    refs = list(references) + [None] * (len(turns) - len(references))
    return [
        JudgeRequest(item_id, i, kind, _conversation(turns[: i + 1], answers[:i]), answers[i], refs[i])
        for i in range(len(turns))
    ]


def item_score(judgements: Sequence[Judgement]) -> Optional[float]:
    """The mean of an item's turn scores; None (unparsed) when any turn is unparsed."""
    if not judgements or any(j.score is None for j in judgements):
        return None
    return sum(j.score for j in judgements) / len(judgements)


def aggregate_judgements(per_item: Sequence[Sequence[Judgement]]) -> dict[str, Any]:
    """A task's judge row: mean over the parsed items, ``n`` of them and ``unparsed`` items."""
    scores = [item_score(js) for js in per_item]
    parsed = [s for s in scores if s is not None]
    return {
        "mean": sum(parsed) / len(parsed) if parsed else float("nan"),
        "n": len(parsed),
        "unparsed": len(scores) - len(parsed),
    }


# ----------------------------------------------------------------------------- backends
class JudgeBackend(Protocol):
    def check(self) -> None:
        """Load or connect now; raise JudgeError (one line) if that fails."""

    def complete(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        """The judge's text for each (system, user) pair, deterministically decoded."""

    def protocol(self) -> dict[str, Any]:
        """What the report records about the judge."""


def _one_line(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LocalJudge:
    """A causal LM from a folder, loaded once (at :meth:`check` or the first :meth:`complete`).

    ``dtype``: ``auto`` (the checkpoint's), ``float32``, ``bfloat16``, ``float16``; ``device``:
    ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when there is one). Greedy, batched, the chat
    template when the tokenizer has one.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 512,
    ) -> None:
        self.model_dir, self.dtype, self.device = Path(model_dir), dtype, device
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._generator = None

    def check(self) -> None:
        if self._generator is not None:
            return
        if not (self.model_dir / "config.json").is_file():
            raise JudgeError(f"--judge {self.model_dir}: no model folder there (no config.json)")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .harness import LoadedLM

        if self.dtype != "auto" and not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise JudgeError(f"--judge-dtype {self.dtype!r} is not allowed: auto, float32, bfloat16 or float16")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        try:
            dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(device).eval()
        except Exception as err:  # noqa: BLE001 - whatever transformers raises, one line
            raise JudgeError(
                f"--judge {self.model_dir}: cannot load it as a causal LM on {device}: "
                f"{type(err).__name__}: {_one_line(err)}"
            ) from None
        self._device = device
        self._generator = LoadedLM(model, tokenizer, batch_size=self.batch_size)

    def complete(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        self.check()
        lm = self._generator
        contexts = [
            lm.prompt([{"role": "system", "content": s}, {"role": "user", "content": u}], True) for s, u in prompts
        ]
        return lm.generate(contexts, max_gen_toks=self.max_new_tokens)

    def protocol(self) -> dict[str, Any]:
        out = {
            "backend": "local",
            "model": str(self.model_dir),
            "dtype": self.dtype,
            "decoding": "greedy",
            "max_new_tokens": self.max_new_tokens,
        }
        if self._generator is not None:
            out.update(
                device=self._device,
                chat_template=bool(getattr(self._generator.tokenizer, "chat_template", None)),
                loaded_dtype=str(next(self._generator.model.parameters()).dtype).replace("torch.", ""),
            )
        return out


def chat_completions_url(url: str) -> str:
    """``http://host:8000``, ``.../v1`` or ``.../v1/chat/completions`` -> the chat completions URL."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class _Sockets:
    """The sockets one request opened, so a timer can end it (``shut``) when its time is up."""

    def __init__(self) -> None:
        self.open: list = []
        self.expired = False
        self._lock = threading.Lock()

    def add(self, sock) -> None:
        with self._lock:
            self.open.append(sock)
            if self.expired:
                self._shut(sock)

    def shut(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self.open:
                self._shut(sock)

    @staticmethod
    def _shut(sock) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # a blocked recv returns at once
        except OSError:
            pass


def _opener(sockets: _Sockets) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies, redirects as usual) whose HTTP(S) connections report their sockets."""

    def tracked(base):
        class Connection(base):
            def connect(self):
                super().connect()
                sockets.add(self.sock)

        return Connection

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(tracked(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(tracked(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(HTTP(), HTTPS())


class URLJudge:
    """An OpenAI-compatible chat endpoint (vLLM's ``serve``, llama.cpp's server, ...).

    Every request: ``model``, the system and user messages, ``temperature`` 0, ``max_tokens``.
    ``api_key`` goes in an ``Authorization: Bearer`` header when given. ``workers`` requests run
    at once (a vLLM server batches them). :meth:`check` sends one short request.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: Optional[str] = None,
        timeout: float = 120.0,
        max_tokens: int = 512,
        workers: int = 4,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise JudgeError(f"--judge-url {url!r} is not allowed: give an http:// or https:// URL")
        if not model:
            raise JudgeError("--judge-url needs --judge-model: the model name the endpoint serves")
        self.url, self.model, self.api_key = chat_completions_url(url), model, api_key
        self.timeout, self.max_tokens, self.workers = timeout, max_tokens, max(1, workers)

    def _post(self, system: str, user: str, max_tokens: int) -> str:
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        where = f"judge at {self.url}"
        late = (
            f"{where}: no answer within {self.timeout:g} s (the limit covers the whole request, connect to last byte)"
        )
        # urlopen's timeout bounds each socket read, so a server that trickles bytes would hold a
        # request for ever: a timer closes the connection when the request's total time is up
        sockets = _Sockets()
        timer = threading.Timer(self.timeout, sockets.shut)
        timer.daemon = True
        timer.start()
        try:
            with _opener(sockets).open(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            if sockets.expired:
                raise JudgeError(late) from None
            detail = err.read().decode("utf-8", "replace") if err.fp else ""
            raise JudgeError(f"{where}: HTTP {err.code} {err.reason}: {_one_line(detail) or '(no body)'}") from None
        except (OSError, http.client.HTTPException) as err:
            if sockets.expired or isinstance(err, TimeoutError):
                raise JudgeError(late) from None
            if isinstance(err, urllib.error.URLError):
                raise JudgeError(f"{where}: cannot connect ({_one_line(err.reason)})") from None
            raise JudgeError(f"{where}: {type(err).__name__}: {_one_line(err)}") from None
        finally:
            timer.cancel()
        if sockets.expired:  # the timer fired as the last bytes came: the answer may be cut
            raise JudgeError(late)
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"{where}: the answer is not an OpenAI chat completion: {_one_line(payload.decode('utf-8', 'replace'))}"
            ) from None
        return content if isinstance(content, str) else ""

    def check(self) -> None:
        self._post(SYSTEM_PROMPT, "Reply with OK.", 1)

    def complete(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda pair: self._post(pair[0], pair[1], self.max_tokens), prompts))

    def protocol(self) -> dict[str, Any]:
        return {"backend": "url", "url": self.url, "model": self.model, "temperature": 0, "max_tokens": self.max_tokens}


class Judge:
    """Grades :class:`JudgeRequest` s with a backend: prompts, completions, parsed judgements."""

    def __init__(self, backend: JudgeBackend) -> None:
        self.backend = backend

    def check(self) -> None:
        self.backend.check()

    def grade(
        self, requests: Sequence[JudgeRequest], progress: Optional[Callable[[int, int], None]] = None
    ) -> list[Judgement]:
        texts = self.backend.complete([r.prompt() for r in requests])
        if progress:
            progress(len(texts), len(requests))
        return [parse_judgement(t) for t in texts]

    def protocol(self) -> dict[str, Any]:
        return {
            **self.backend.protocol(),
            "format": "Prometheus-2 absolute grading (1-5, [RESULT] n)",
            "rubrics": {kind: r.criterion for kind, r in RUBRICS.items()},
        }


def make_judge(
    model_dir: Optional[str] = None, url: Optional[str] = None, model: Optional[str] = None, **options: Any
) -> Optional[Judge]:
    """``--judge DIR`` or ``--judge-url URL --judge-model NAME`` (not both); None without either."""
    if model_dir and url:
        raise JudgeError("--judge and --judge-url are exclusive: give a local model folder or an endpoint")
    if model and not url:
        raise JudgeError("--judge-model names the model of --judge-url; give --judge-url too")
    if model_dir:
        return Judge(LocalJudge(model_dir, **options))
    if url:
        return Judge(URLJudge(url, model or "", **options))
    return None
