"""``macdrop attack --gen-tasks`` as a user runs it: a planted model whose answers are known, a
judge behind a real local HTTP server (OpenAI-compatible), the JSON rows, the per-item file, and
the one-line refusals before anything generates."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers.process import BIN, run_cli
from helpers.tiny_answers import build_successor_llama

pytestmark = pytest.mark.slow
ENV = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
#: planted chains: a prompt ending in "sky" is answered " blue", one ending in "grass" " green"
CHAINS = [["Ġsky", "Ġblue", "</s>"], ["Ġgrass", "Ġgreen", "</s>"]]
ITEMS = [
    {"question_id": 1, "category": "qa", "turns": ["the colour of the sky"], "reference": ["blue"]},
    {"question_id": 2, "category": "qa", "turns": ["the colour of the grass"], "reference": ["red"]},
]


class Judge(BaseHTTPRequestHandler):
    """Scores 5 when the response under judgement says "blue", and answers nonsense otherwise."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - the http.server hook
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        if "###Response to evaluate:" not in user:  # the start-up check: any answer will do
            text = "ok"
        else:
            response = user.split("###Response to evaluate:")[1].split("###")[0]
            text = "Feedback: it names the colour. [RESULT] 5" if "blue" in response else "I cannot grade this."
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture(scope="module")
def judge_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = build_successor_llama(tmp_path_factory.mktemp("successor"), CHAINS)
    tasks = folder / "colours.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return folder, tasks


def test_generation_tasks_under_the_sweep_with_a_url_judge(planted, judge_url, tmp_path):
    folder, tasks = planted
    out = tmp_path / "attack.json"
    proc = run_cli(
        ["macdrop", "attack", str(folder), "--mode", "retain", "--k", "1", "--layer", "0", "--indices", "3",
         "--gen-tasks", str(tasks), "--max-new-tokens", "4", "--judge-url", judge_url, "--judge-model", "fake",
         "--json", str(out), "--no-progress"],
        cwd=tmp_path, env_extra=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["setting"], r["metric"]): r for r in report["generation"]}
    clean = {m: r for (s, m), r in rows.items() if s == "clean"}
    # the planted model answers " blue" and " green": ROUGE-L 1 and 0 against "blue" / "red"
    assert clean["rouge_l"]["value"] == pytest.approx(0.5)
    assert clean["rouge_l"]["n"] == 2
    assert clean["rouge_l"]["task"] == "colours"
    # the judge parsed one answer (5) and not the other, which is counted, not scored
    assert clean["judge"]["value"] == 5.0
    assert clean["judge"]["n"] == 1
    assert clean["judge"]["unparsed"] == 1
    assert {s for s, _ in rows} == {"clean", "retain k=1"}
    assert report["generation_protocol"]["judge"]["model"] == "fake"
    items = [json.loads(line) for line in (tmp_path / "attack.generation.jsonl").read_text().splitlines()]
    first = next(it for it in items if it["setting"] == "clean" and it["id"] == "1")
    assert [o.strip() for o in first["outputs"]] == ["blue"]
    assert first["judge_score"] == 5.0
    assert "names the colour" in first["judgements"][0]["feedback"]
    second = next(it for it in items if it["setting"] == "clean" and it["id"] == "2")
    assert second["judge_score"] is None
    assert second["judgements"][0]["unparsed"]
    assert "colours judge" in proc.stdout  # the table's column


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--gen-tasks", "gsm9k"], "unknown task 'gsm9k': choose from gsm8k, nq_open, squadv2"),
        (["--gen-tasks", "nq_open", "--limit", "0"], "--limit 0 is not allowed"),
        (["--gen-tasks", "nq_open", "--judge-url", "http://127.0.0.1:9", "--judge-model", "x"], "http://127.0.0.1:9"),
        (["--judge-url", "http://127.0.0.1:9"], "give --gen-tasks too"),
        (
            ["--gen-tasks", "needle", "--needle-lengths", "256,4096"],
            "--needle-lengths 4096 is longer than the model's max_position_embeddings (512) less the 16-token answer",
        ),
        (["--gen-tasks", "needle", "--needle-depths", "0,abc"], "--needle-depths '0,abc': 'abc' is not an integer"),
        (["--gen-tasks", "longbench_hotpotqa", "--longbench-dir", "no-such-dir"], "hotpotqa.jsonl"),
        (["--gen-tasks", "nq_open", "--needle-depths", "0,50"], "--needle-depths sets up the needle"),
    ],
    ids=[
        "unknown-task",
        "limit-0",
        "judge-unreachable",
        "judge-without-tasks",
        "needle-too-long",
        "needle-depth",
        "longbench-missing",
        "needle-option-without-needle",
    ],
)
def test_bad_generation_options_are_one_line_before_anything_generates(extra, fragment, planted, tmp_path):
    folder, _ = planted
    proc = run_cli(["macdrop", "attack", str(folder), *extra], cwd=tmp_path, env_extra=ENV, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("macdrop: error: ")
    assert fragment in lines[0]
    assert "attack:" not in proc.stdout  # the model under test never loaded


def test_needle_grid_under_the_sweep(planted, tmp_path):
    """The needle through ``macdrop attack``: one row per setting x length x depth (and the overall
    row), prompts of the asked length, the grid table, the heat map, the memory in the rows."""
    folder, _ = planted
    out = tmp_path / "needle.json"
    proc = run_cli(
        ["macdrop", "attack", str(folder), "--mode", "zero", "--k", "1", "--layer", "0", "--indices", "3",
         "--gen-tasks", "needle", "--needle-lengths", "256,496", "--needle-depths", "0,100", "--needle-samples", "2",
         "--json", str(out), "--plot", str(tmp_path), "--no-progress"],
        cwd=tmp_path, env_extra=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    cells = [r for r in report["generation"] if "length" in r]
    assert sorted((r["setting"], r["length"], r["depth"]) for r in cells) == sorted(
        (s, n, d) for s in ("clean", "zero k=1") for n in (256, 496) for d in (0, 100)
    )
    assert all(r["n"] == 2 and r["metric"] == "needle_match" and r["value"] in (0.0, 0.5, 1.0) for r in cells)
    overall = [r for r in report["generation"] if "length" not in r]
    assert [r["n"] for r in overall] == [8, 8]
    assert all(r["peak_memory_mb"] > 0 for r in overall)
    (task,) = report["generation_protocol"]["tasks"]
    assert task["task"] == "needle"
    assert task["metrics"] == ["needle_match"]
    items = [json.loads(line) for line in (tmp_path / "needle.generation.jsonl").read_text().splitlines()]
    assert len(items) == 16
    assert all(it["length"] - 8 <= it["prompt_tokens"] <= it["length"] for it in items)
    assert "| length \\ depth % | 0 | 100 |" in proc.stdout
    assert (tmp_path / "needle_heatmap.png").stat().st_size > 5000


def test_longbench_from_local_files_under_the_sweep(tmp_path):
    """LongBench's JSONL files through ``macdrop attack``: lm-eval's longbench_* tasks, their scores
    (lm-eval's metrics.py on what the model wrote), the few-shot task without the chat template,
    LongBench's middle truncation."""
    from helpers.lm_eval_longbench import lm_eval_metrics

    chains = [["Ġsky", "Ġblue", "<|im_end|>"], ["Ġgrass", "Ġgreen", "<|im_end|>"]]
    folder = build_successor_llama(tmp_path / "model", chains, tokenizer="chatml")
    data = tmp_path / "lb"
    data.mkdir()
    classes = ["City", "Animal", "Other"]
    rows = {
        "hotpotqa": [
            {"_id": "h1", "input": "Which colour is the sky?", "context": "Passage 1:\nthe sky is blue",
             "answers": ["blue"], "all_classes": None, "length": 5},
            {"_id": "h2", "input": "Which colour is the grass?", "context": "Passage 1:\nthe grass is green " * 40,
             "answers": ["green grass", "red"], "all_classes": None, "length": 160},
        ],
        "trec": [
            {"_id": "t1", "input": "What is a fox?", "context": "Question: What is a dog?\nType: Animal",
             "answers": ["Animal"], "all_classes": classes, "length": 9},
            {"_id": "t2", "input": "Where is Paris?", "context": "Question: Where is Rome?\nType: City",
             "answers": ["City"], "all_classes": classes, "length": 9},
        ],
    }  # fmt: skip
    for name, items in rows.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    # LongBench's default 7,500 tokens do not fit this model's 512 positions: one line, nothing loads
    proc = run_cli(
        ["macdrop", "attack", str(folder), "--gen-tasks", "longbench_hotpotqa", "--longbench-dir", str(data)],
        cwd=tmp_path, env_extra=ENV,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "macdrop: error: --max-length 7500 + a 32-token answer is more than the model's 512 positions: "
        "give --max-length 480 or less"
    )
    out = tmp_path / "lb.json"
    proc = run_cli(
        ["macdrop", "attack", str(folder), "--mode", "zero", "--k", "1", "--layer", "0", "--indices", "3",
         "--gen-tasks", "longbench_hotpotqa,longbench_trec", "--longbench-dir", str(data), "--max-length", "64",
         "--max-new-tokens", "4", "--json", str(out), "--no-progress"],
        cwd=tmp_path, env_extra=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    protocol = report["generation_protocol"]
    assert protocol["plain_prompt_tasks"] == ["longbench_trec"]
    assert protocol["chat_template"] is True
    items = [json.loads(line) for line in (tmp_path / "lb.generation.jsonl").read_text().splitlines()]
    assert len(items) == 8  # 2 tasks x 2 items x 2 settings
    long_prompt = next(it for it in items if it["id"] == "h2")["turns"][0]
    assert "Which colour is the grass?" in long_prompt  # the question at the end survives the middle cut
    assert long_prompt.count("the grass is green") < 40
    oracle = lm_eval_metrics()  # lm-eval's own process_results, on what the model wrote
    for it in items:
        doc = {"answers": it["references"][0], "all_classes": classes if it["task"] == "longbench_trec" else None}
        process = (
            oracle.get_qa_f1_with_score if it["task"] == "longbench_hotpotqa" else oracle.get_classification_with_score
        )
        assert it["scores"]["score,none"] == pytest.approx(process(doc, [it["outputs"][0]])["score"])
    rows_out = {(r["setting"], r["task"]): r for r in report["generation"]}
    tasks = ("longbench_hotpotqa", "longbench_trec", "longbench")
    assert set(rows_out) == {(s, t) for s in ("clean", "zero k=1") for t in tasks}
    for setting in ("clean", "zero k=1"):
        assert rows_out[(setting, "longbench_hotpotqa")]["n"] == 2
        average = rows_out[(setting, "longbench")]
        assert (average["metric"], average["n"]) == ("average", 2)  # the paper's headline: the mean of the tasks
        mine = [it for it in items if it["setting"] == setting]
        per_task = [sum(it["scores"]["score,none"] for it in mine if it["task"] == t) / 2 for t in tasks[:2]]
        assert average["value"] == pytest.approx(sum(per_task) / 2)


class Trickle(BaseHTTPRequestHandler):
    """Answers with headers at once, then one byte of the body every 0.2 s: no single read waits
    long, so a per-read timeout never fires."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - the http.server hook
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b" ")
                self.wfile.flush()
                threading.Event().wait(0.2)
        except OSError:  # the client hung up: what it should do
            pass


def test_a_judge_that_trickles_bytes_is_cut_off_at_the_total_deadline(planted, tmp_path):
    """issue 32, item 9: --judge-timeout bounds the whole request, connect to last byte."""
    import time

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    folder, tasks = planted
    try:
        start = time.monotonic()
        proc = run_cli(
            ["macdrop", "attack", str(folder), "--gen-tasks", str(tasks), "--judge-url", url]
            + ["--judge-model", "x", "--judge-timeout", "3"],
            cwd=tmp_path,
            env_extra=ENV,
            timeout=300,
        )
        elapsed = time.monotonic() - start
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"macdrop: error: judge at {url}/v1/chat/completions: no answer within 3 s "
        "(the limit covers the whole request, connect to last byte)"
    ]
    assert "attack:" not in proc.stdout  # refused before the model under test loaded
    assert elapsed < 60  # not the 200 s the trickle would take, nor for ever
