"""What batching buys: batched greedy generation vs one prompt at a time, same model, same prompts.

    python benchmarks/generation.py --preset cpu [--batch-size 16] [--items 16] [--repeats 3] [--json out.json]
    python benchmarks/generation.py --model models/SmolLM2-135M-Instruct [--task nq_open] [--items 16]
    python benchmarks/generation.py --model models/SmolLM2-135M-Instruct --items 96 --repeats 1  # mismatch rate

Two arms on the first ``--items`` prompts of ``--task`` (evaluate/tasks.py: the prompt as the
task builds it, under the chat template when the tokenizer has one), ``--max-new-tokens`` each:

* **batched**: evaluate/generate.py's ``BatchedGenerator`` at ``--batch-size`` (left padding, KV
  cache, finished rows dropped);
* **one by one**: analysis/generation.py's ``greedy_generate`` on each prompt's ids in turn
  (what ``attack --generate`` runs), the same ids (``BatchedGenerator.encode``).

Neither arm uses stop strings (``greedy_generate`` has none), so both generate until an end
token or the budget and their tokens can be compared item by item: the figures are the tokens/s
of each arm, their ratio (median over alternating pairs, benchlib), and the items whose tokens
differ (count, rate, the first differing position): where fp kernels make batch and single
disagree on a real model (evaluate/generate.py's docstring says why).

Models: ``cpu``: tests/helpers/tiny.py's planted 2-layer Llama (hidden 64: per-step overhead dominates);
``--model DIR`` a real checkpoint (fp32 unless ``--dtype``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import Clock, median


def load(model_dir: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def prompts(task: str, items: int) -> list[str]:
    from llamafactory_macdrop.analysis.evaluate.tasks import load_task

    return [item.turns[0] for item in load_task(task, limit=items).items]


def batched(model, tokenizer, texts, max_new_tokens: int, batch_size: int) -> dict:
    from llamafactory_macdrop.analysis.evaluate.generate import BatchedGenerator, GenerationRequest

    generator = BatchedGenerator(model, tokenizer, batch_size=batch_size)
    requests = [GenerationRequest(str(i), (t,), max_new_tokens) for i, t in enumerate(texts)]
    with Clock() as c:
        results = generator.generate(requests)
    tokens = [list(r.turns[0].token_ids) for r in results]
    return {"seconds": c.seconds, "tokens": tokens, "chat_template": generator.chat_template}


def one_by_one(model, tokenizer, texts, max_new_tokens: int) -> dict:
    from llamafactory_macdrop.analysis.attack.generation import end_tokens, greedy_generate
    from llamafactory_macdrop.analysis.evaluate.generate import BatchedGenerator

    encode = BatchedGenerator(model, tokenizer).encode
    stop = end_tokens(model, tokenizer)
    ids = [encode([t]) for t in texts]
    with Clock() as c:
        tokens = [greedy_generate(model, i, max_new_tokens, stop)[0] for i in ids]
    return {"seconds": c.seconds, "tokens": tokens, "prompt_tokens": [len(i) for i in ids]}


def first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["cpu"], default=None)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--task", default="nq_open")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if (args.preset is None) == (args.model is None):
        parser.error("give --preset cpu or --model DIR")
    benchlib.set_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from helpers import tiny

            model_dir = tiny.build_planted_llama(Path(tmp) / "tiny")
        else:
            model_dir = args.model
        model, tokenizer = load(model_dir, args.dtype)
        texts = prompts(args.task, args.items)
        arms = {
            "batched": lambda: batched(model, tokenizer, texts, args.max_new_tokens, args.batch_size),
            "one_by_one": lambda: one_by_one(model, tokenizer, texts, args.max_new_tokens),
        }
        record = benchlib.machine()
        pairs = benchlib.alternate(arms, args.repeats)
    record = benchlib.finish_record(record)

    last = pairs[-1]
    single, batch = last["one_by_one"]["tokens"], last["batched"]["tokens"]
    differ = [i for i, (a, b) in enumerate(zip(batch, single)) if a != b]
    same_across_pairs = all(p["batched"]["tokens"] == batch and p["one_by_one"]["tokens"] == single for p in pairs)
    rates = {arm: [sum(map(len, p[arm]["tokens"])) / p[arm]["seconds"] for p in pairs] for arm in arms}
    ratio = median(r_b / r_s for r_b, r_s in zip(rates["batched"], rates["one_by_one"]))
    report = {
        "model": str(model_dir) if args.model else "tests/helpers/tiny.py planted Llama (2 layers, hidden 64)",
        "dtype": args.dtype,
        "task": args.task,
        "items": len(texts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "chat_template": last["batched"]["chat_template"],
        "prompt_tokens": {
            "min": min(last["one_by_one"]["prompt_tokens"]),
            "max": max(last["one_by_one"]["prompt_tokens"]),
        },
        "new_tokens": {"batched": sum(map(len, batch)), "one_by_one": sum(map(len, single))},
        "tokens_per_s": {arm: round(median(v), 2) for arm, v in rates.items()},
        "speedup": round(ratio, 2),
        "items_differing": len(differ),
        "differing_rate": round(len(differ) / len(texts), 4),
        "first_difference_at": {str(i): first_difference(batch[i], single[i]) for i in differ},
        "deterministic_across_pairs": same_across_pairs,
        "pairs": [{arm: round(p[arm]["seconds"], 3) for arm in arms} for p in pairs],
        "machine": record,
    }
    print(
        f"[bench] {report['model']} ({args.dtype}), {args.task} x {len(texts)}, batch {args.batch_size}, "
        f"{args.max_new_tokens} new tokens max, chat template {report['chat_template']}"
    )
    print(
        f"[bench] tokens/s: batched {report['tokens_per_s']['batched']}, one by one {report['tokens_per_s']['one_by_one']}"
        f" -> {report['speedup']}x (median of {len(pairs)} pairs)"
    )
    print(
        f"[bench] items whose tokens differ: {len(differ)}/{len(texts)}"
        + (f" (first differing position: {report['first_difference_at']})" if differ else "")
    )
    print(f"[bench] {benchlib.describe(record)}")
    benchlib.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
