"""evaluate/judge.py: the prompt's structure, the "[RESULT] n" parser on real-format, malformed and
out-of-range judgements, a planted tiny local judge end to end, and the URL judge against a real
HTTP server on 127.0.0.1 (OpenAI's chat completions shape), its errors in one line."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers.tiny_answers import build_successor_llama

from llamafactory_macdrop.analysis.evaluate.judge import (
    RUBRICS,
    Judge,
    JudgeError,
    JudgeRequest,
    LocalJudge,
    URLJudge,
    aggregate_judgements,
    chat_completions_url,
    judge_prompt,
    judge_requests,
    make_judge,
    parse_judgement,
)

#: a judgement as Prometheus-2 writes them
REAL = (
    "Feedback: The response identifies the correct final answer of 18 and explains each step, though the "
    "second step could state the price per egg more clearly. [RESULT] 4"
)


@pytest.mark.parametrize(
    "text, score",
    [
        (REAL, 4),
        ("The answer is wrong.\n[RESULT] 1", 1),
        ("Feedback: fine [RESULT]: 5", 5),
        ("fine [RESULT] (3)", 3),
        ("fine [RESULT] 2/5", 2),
        ("fine [RESULT] 2 out of 5", 2),
        ("fine [result] 3.", 3),
        # the format line echoed first, the verdict last
        ("Format: Feedback: ... [RESULT] (an integer number between 1 and 5)\nFeedback: ok [RESULT] 5", 5),
        ("[RESULT] 2 ... on reflection [RESULT] 3", 3),
    ],
)
def test_parser_reads_the_last_result(text, score):
    judged = parse_judgement(text)
    assert (judged.score, judged.unparsed) == (score, None) and judged.raw == text


@pytest.mark.parametrize(
    "text, why",
    [
        ("Feedback: good answer. Score: 4", "no \\[RESULT\\]"),
        ("", "no \\[RESULT\\]"),
        ("Feedback: good [RESULT] four", "no integer"),
        ("Feedback: good [RESULT]", "no integer"),
        ("Feedback: good [RESULT] 4.5", "not an integer: 4.5"),
        ("Feedback: good [RESULT] 7", "out of range: 7"),
        ("Feedback: good [RESULT] 0", "out of range: 0"),
        ("Feedback: good [RESULT] -2", "out of range: -2"),
        ("Feedback: good [RESULT] 4/10", "out of 10"),
        ("Feedback: ok [RESULT] 4 ... [RESULT] 9", "out of range: 9"),  # the last one counts, even when bad
    ],
)
def test_parser_leaves_malformed_and_out_of_range_unparsed(text, why):
    judged = parse_judgement(text)
    assert judged.score is None and re.search(why, judged.unparsed)


def test_feedback_is_kept():
    assert parse_judgement(REAL).feedback.startswith("The response identifies") and parse_judgement(
        REAL
    ).feedback.endswith("clearly.")


def test_prompt_structure_follows_the_absolute_grading_format():
    prompt = judge_prompt("What is 2+2?", "4", RUBRICS["math"], reference="2+2 = 4. #### 4")
    heads = [
        "###Task Description:",
        "###The instruction to evaluate:",
        "###Response to evaluate:",
        "###Reference Answer (Score 5):",
        "###Score Rubrics:",
        "###Feedback:",
    ]
    assert [prompt.index(h) for h in heads] == sorted(prompt.index(h) for h in heads)
    assert "[RESULT]" in prompt and prompt.rstrip().endswith("###Feedback:")
    assert all(f"Score {i}: " in prompt for i in range(1, 6)) and f"[{RUBRICS['math'].criterion}]" in prompt
    bare = judge_prompt("Say hi.", "hi", RUBRICS["open"])
    assert "###Reference Answer" not in bare and "reference answer" not in bare
    assert set(RUBRICS) == {"math", "short_qa", "context_qa", "open"}


def test_conversations_are_judged_turn_by_turn():
    first, second = judge_requests(
        "7", "open", ("Write a poem.", "Shorter."), ["roses", "rose"], [None, "a short poem"]
    )
    assert (first.instruction, first.response, first.reference) == ("Write a poem.", "roses", None)
    assert "User: Write a poem." in second.instruction and "Assistant: roses" in second.instruction
    assert second.instruction.index("User: Shorter.") > second.instruction.index("Assistant: roses")
    assert (second.response, second.reference, second.turn) == ("rose", "a short poem", 1)
    rows = aggregate_judgements(
        [
            [parse_judgement("[RESULT] 4"), parse_judgement("[RESULT] 2")],
            [parse_judgement("[RESULT] 5"), parse_judgement("no verdict")],
            [parse_judgement("[RESULT] 5")],
        ]
    )
    assert rows == {"mean": 4.0, "n": 2, "unparsed": 1}  # (3 + 5) / 2; the half-judged item is unparsed


# ----------------------------------------------------------------------------- a local judge
def test_a_tiny_local_judge_end_to_end(tmp_path):
    # the judge prompt ends in "###Feedback: " -> its last token "Ġ" starts the planted "[RESULT]3"
    folder = build_successor_llama(tmp_path / "judge", [["Ġ", "[", "R", "E", "S", "U", "L", "T", "]", "3", "</s>"]])
    backend = LocalJudge(folder, dtype="float32", device="cpu", batch_size=2, max_new_tokens=16)
    judge = Judge(backend)
    judge.check()
    requests = [
        JudgeRequest(str(i), 0, kind, f"question {i}", f"answer {i}", "ref" if i % 2 else None)
        for i, kind in enumerate(["math", "short_qa", "context_qa"])
    ]
    judged = judge.grade(requests)
    assert [(j.score, j.raw, j.unparsed) for j in judged] == [(3, "[RESULT]3", None)] * 3
    protocol = judge.protocol()
    assert protocol["backend"] == "local" and protocol["device"] == "cpu" and protocol["loaded_dtype"] == "float32"
    assert protocol["chat_template"] is False and "Prometheus-2" in protocol["format"]


def test_a_local_judge_that_cannot_load_fails_at_check(tmp_path):
    with pytest.raises(JudgeError, match="no model folder") as err:
        LocalJudge(tmp_path / "absent").check()
    assert "\n" not in str(err.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(JudgeError, match="cannot load it as a causal LM") as err:
        LocalJudge(tmp_path / "broken", device="cpu").check()
    assert "\n" not in str(err.value)
    with pytest.raises(JudgeError, match="--judge-dtype"):
        LocalJudge(tmp_path / "broken", dtype="float8").check()


# ----------------------------------------------------------------------------- a URL judge
class FakeOpenAI(BaseHTTPRequestHandler):
    """``/v1/chat/completions``: answers by the response under judgement; ``/broken/...``: HTTP 500;
    ``/garbage/...``: 200 with a body that is not JSON; ``/slow/...``: answers after 2 s."""

    replies = {}
    seen = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - the http.server hook
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body, self.headers.get("Authorization")))
        if self.path.startswith("/broken/"):
            return self._send(500, b"upstream error:\n  the model is overloaded\n")
        if self.path.startswith("/garbage/"):
            return self._send(200, b"<html>hello</html>")
        if self.path.startswith("/slow/"):
            time.sleep(2)
        if self.path not in ("/v1/chat/completions", "/slow/v1/chat/completions"):
            return self._send(404, b"not found")
        user = body["messages"][-1]["content"]
        found = re.search(r"###Response to evaluate:\n(.*?)\n\n###", user, re.S)
        content = "OK" if found is None else type(self).replies.get(found.group(1), "Feedback: hm")
        self._send(
            200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
        )

    def _send(self, code, payload):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_judge_against_a_local_openai_endpoint(server):
    FakeOpenAI.replies = {
        "good": REAL,
        "bad": "Feedback: wrong. [RESULT] 1",
        "odd": "Feedback: [RESULT] 6",
        "silent": "I cannot grade this.",
    }
    FakeOpenAI.seen = []
    judge = make_judge(url=server, model="prometheus-7b", api_key="k", workers=3)
    judge.check()
    requests = [JudgeRequest(r, 0, "short_qa", "q", r, "ref") for r in ("good", "bad", "odd", "silent")]
    judged = judge.grade(requests)
    assert [j.score for j in judged] == [4, 1, None, None]
    assert judged[2].unparsed.startswith("out of range") and judged[3].unparsed == "no [RESULT]"
    path, body, auth = FakeOpenAI.seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["model"] == "prometheus-7b" and body["temperature"] == 0 and body["max_tokens"] == 512
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert aggregate_judgements([[j] for j in judged]) == {"mean": 2.5, "n": 2, "unparsed": 2}
    assert judge.protocol()["url"] == f"{server}/v1/chat/completions"


def test_url_judge_errors_are_one_line(server, tmp_path):
    for path, says in (
        ("/broken", "HTTP 500 .*upstream error: the model is overloaded"),
        ("/garbage", "not an OpenAI chat completion"),
        ("/nowhere/x", "HTTP 404"),
    ):
        with pytest.raises(JudgeError, match=says) as err:
            URLJudge(server + path + ("" if path == "/nowhere/x" else "/v1"), "m").check()
        assert "\n" not in str(err.value)
    with pytest.raises(JudgeError, match="no answer within 0.5 s"):
        URLJudge(server + "/slow", "m", timeout=0.5).check()
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match="cannot connect") as err:
        URLJudge(f"http://127.0.0.1:{port}", "m", timeout=2).check()
    assert "\n" not in str(err.value)


def test_choosing_a_judge():
    assert make_judge() is None
    with pytest.raises(JudgeError, match="exclusive"):
        make_judge("dir", "http://x")
    with pytest.raises(JudgeError, match="give --judge-url too"):
        make_judge(model="m")
    with pytest.raises(JudgeError, match="needs --judge-model"):
        make_judge(url="http://x")
    with pytest.raises(JudgeError, match="http:// or https://"):
        URLJudge("localhost:8000", "m")
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_a_jsonl_task_generated_scored_and_judged(tmp_path, server):
    """The pieces together as the commands will join them: a Spec-Bench file, a planted model's
    answers turn by turn, reference metrics where a reference exists, the URL judge per turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamafactory_macdrop.analysis.evaluate.gen_tasks import GenerationSuite
    from llamafactory_macdrop.analysis.evaluate.tasks import load_task

    folder = build_successor_llama(tmp_path / "m", [["Ġsky", "Ġblue", "</s>"], ["Ġsnow", "Ġis", "Ġwhite", "</s>"]])
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    path = tmp_path / "question.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "question_id": 1,
                    "category": "mt_bench",
                    "turns": ["the sky", "and the snow"],
                    "reference": ["blue", "white"],
                },
                {"question_id": 2, "category": "qa", "turns": ["the snow"]},
            ]
        )
    )
    FakeOpenAI.replies = {" blue": "ok [RESULT] 5", " is white": "meh [RESULT] 2"}
    suite = GenerationSuite(model, tok, [load_task(str(path))], judge=make_judge(url=server, model="m"), batch_size=2)
    (result,) = suite.evaluate()
    assert [it["outputs"] for it in result.items] == [[" blue", " is white"], [" is white"]]
    rouge = (1.0 + 2 / 3) / 2  # "blue" vs "blue"; "is white" vs "white": P 1/2, R 1
    assert result.item_scores("rouge_l") == [pytest.approx(rouge), None]
    assert result.metrics["rouge_l"]["n"] == 1
    assert [len(it["judgements"]) for it in result.items] == [2, 1]
    assert result.judge == {"mean": 2.75, "n": 2, "unparsed": 0}  # (5 + 2) / 2 and 2
