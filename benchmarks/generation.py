"""What lm-eval's batching buys: HFLM.generate_until (the engine of every generation task) vs one prompt at a time.

    python benchmarks/generation.py --preset cpu [--batch-size 16] [--items 16] [--repeats 3] [--json out.json]
    python benchmarks/generation.py --model models/SmolLM2-135M-Instruct [--task nq_open] [--items 16]
    python benchmarks/generation.py --model models/SmolLM2-135M-Instruct --items 96 --repeats 1  # mismatch rate

Two arms on lm-eval's text of the first ``--items`` documents of ``--task`` (under the chat
template when the tokenizer has one, as the tasks run), ``--max-new-tokens`` each, no stop strings:

* **batched**: evaluate/harness.py's ``LoadedLM.generate``, i.e. lm-eval's ``HFLM.generate_until``
  at ``--batch-size`` (its length-sorted batches, left padding, ``model.generate`` with its stop
  criteria);
* **one by one**: attack/generation.py's ``greedy_generate`` on each prompt's ids in turn (what
  ``attack --generate`` runs), the same ids (``encode_prompt``: what HFLM feeds).

Both generate until an end token or the budget, so their texts can be compared item by item:
the figures are the new tokens/s of each arm (the outputs re-tokenized: HFLM returns text), their
ratio (median over alternating pairs, benchlib), and the items whose texts differ.

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
    """lm-eval's own text of the task's first documents (its ``doc_to_text``)."""
    from llamafactory_macdrop.analysis.evaluate.tasks import load_task

    spec = load_task(task, limit=items)
    return [spec.task.doc_to_text(doc) for doc in list(spec.task.eval_docs)[:items]]


def batched(model, tokenizer, texts, max_new_tokens: int, batch_size: int) -> dict:
    from llamafactory_macdrop.analysis.evaluate.harness import LoadedLM, uses_chat_template

    lm = LoadedLM(model, tokenizer, batch_size=batch_size)
    chat = uses_chat_template(tokenizer)
    contexts = [lm.prompt([{"role": "user", "content": t}], chat) for t in texts]
    with Clock() as c:
        outputs = lm.generate(contexts, until=(), max_gen_toks=max_new_tokens)
    tokens = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in outputs]
    return {"seconds": c.seconds, "tokens": tokens, "texts": outputs, "chat_template": chat}


def one_by_one(model, tokenizer, texts, max_new_tokens: int) -> dict:
    from llamafactory_macdrop.analysis.attack.generation import end_tokens, greedy_generate
    from llamafactory_macdrop.analysis.evaluate.harness import encode_prompt

    stop = end_tokens(model, tokenizer)
    ids = [encode_prompt(tokenizer, t, True) for t in texts]
    with Clock() as c:
        new = [greedy_generate(model, i, max_new_tokens, stop)[0] for i in ids]
    texts_out = [tokenizer.decode([t for t in n if t not in stop], skip_special_tokens=True) for n in new]
    tokens = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in texts_out]
    return {"seconds": c.seconds, "tokens": tokens, "texts": texts_out, "prompt_tokens": [len(i) for i in ids]}


def previous_engine(rev: str):
    """The batched decoder this engine replaced (evaluate/generate.py, deleted), read from git at ``rev``."""
    import subprocess
    import types

    package = "llamafactory_macdrop.analysis.evaluate"
    path = package.replace(".", "/") + "/generate.py"  # deleted from the tree: only git history has it
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=benchlib.REPO, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(package + "._previous_generate")
    module.__package__ = package  # its relative imports resolve as they did
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def previous(model, tokenizer, texts, max_new_tokens: int, batch_size: int, module) -> dict:
    generator = module.BatchedGenerator(model, tokenizer, batch_size=batch_size)
    requests = [module.GenerationRequest(str(i), (t,), max_new_tokens) for i, t in enumerate(texts)]
    with Clock() as c:
        results = generator.generate(requests)
    outputs = [r.turns[0].text for r in results]
    tokens = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in outputs]
    return {"seconds": c.seconds, "tokens": tokens, "texts": outputs}


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
    parser.add_argument(
        "--previous",
        default=None,
        metavar="REV",
        help="a third arm: the batched decoder the engine replaced, read from git at REV (e.g. 72c83dd)",
    )
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
        if args.previous:
            module = previous_engine(args.previous)
            arms["previous"] = lambda: previous(model, tokenizer, texts, args.max_new_tokens, args.batch_size, module)
        record = benchlib.machine()
        pairs = benchlib.alternate(arms, args.repeats)
    record = benchlib.finish_record(record)

    last = pairs[-1]
    single, batch = last["one_by_one"]["tokens"], last["batched"]["tokens"]
    differ = [i for i, (a, b) in enumerate(zip(last["batched"]["texts"], last["one_by_one"]["texts"])) if a != b]
    same_across_pairs = all(p["batched"]["texts"] == last["batched"]["texts"] for p in pairs)
    rates = {arm: [sum(map(len, p[arm]["tokens"])) / p[arm]["seconds"] for p in pairs] for arm in arms}
    ratio = median(r_b / r_s for r_b, r_s in zip(rates["batched"], rates["one_by_one"]))
    if args.previous:  # lm-eval's batches against the decoder they replaced, per pair
        versus = median(b / p for b, p in zip(rates["batched"], rates["previous"]))
        same = sum(a == b for a, b in zip(last["batched"]["texts"], last["previous"]["texts"]))
    report = {
        "model": str(model_dir) if args.model else "tests/helpers/tiny.py planted Llama (2 layers, hidden 64)",
        "dtype": args.dtype,
        "task": args.task,
        "engine": "lm-eval HFLM.generate_until",
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
        **(
            {
                "previous": {
                    "rev": args.previous,
                    "tokens_per_s_ratio_lm_eval_over_previous": round(versus, 3),
                    "items_per_s": {a: round(median(len(texts) / p[a]["seconds"] for p in pairs), 3) for a in arms},
                    "items_with_the_same_text": same,
                }
            }
            if args.previous
            else {}
        ),
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
    if args.previous:
        print(
            f"[bench] lm-eval HFLM vs the previous decoder ({args.previous}): {versus:.2f}x tokens/s, items/s "
            f"{report['previous']['items_per_s']}, same text {same}/{len(texts)}"
        )
    print(f"[bench] {benchlib.describe(record)}")
    benchlib.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
