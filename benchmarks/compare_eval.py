"""What ``macdrop compare``'s evaluation costs: one base with adapters swapped vs a reload per adapter.

    python benchmarks/compare_eval.py --preset cpu [--adapters 4] [--repeats 3] [--json out.json]
    python benchmarks/compare_eval.py --model models/SmolLM2-135M-Instruct --text-file tests/data/english.txt

(a) **One base vs reload per adapter.** N LoRA adapters (r 8 on every linear layer, random
B so they change the model), each evaluated under the baseline and top-5 zeroing on the same
windows through the project's own path (``compare_eval.OneBaseEvaluator``): ONCE with the base
loaded a single time and each adapter attached and unloaded in turn (what ``macdrop compare``
does), and the naive way, the base loaded again for every adapter. Alternating pairs, median
ratio; the items of both arms are compared and must be identical.

(b) **Swap cost.** Inside the one-base arm: attaching + unloading an adapter against the
evaluation of that adapter (seconds each), and the SHA-256 fingerprint of the base that proves
the restore (once before, once after all adapters).

Models: ``cpu``: the random 8-layer Llama of ``attack_sweep.py`` (106 M parameters) with a
massive activation planted at layer 2; ``--model DIR`` a real checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import Clock, median

PRESET = dict(layers=8, hidden=768, intermediate=2048, heads=12, vocab=32000, dtype="bfloat16")


def make_adapters(model_dir: Path, out: Path, n: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for i in range(n):
        folder = out / f"adapter{i}"
        if not (folder / "adapter_config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
            torch.manual_seed(i)
            with torch.no_grad():
                for name, p in peft.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.01)
            peft.save_pretrained(folder)
        folders.append(folder)
    return folders


def corpus(model_dir: Path, text_file: Path | None, tokens: int):
    import torch
    from transformers import AutoTokenizer

    from llamafactory_macdrop.analysis.evaluate.perplexity import PerplexityProtocol, TextSource, make_windows, tokenize
    from llamafactory_macdrop.analysis.sweep.loop import PreparedCorpus

    protocol = PerplexityProtocol(seq_len=256, bos="stream", max_windows=max(1, tokens // 256))
    if text_file is not None:
        tok = AutoTokenizer.from_pretrained(model_dir)
        text = text_file.read_text()
        stream, bos = tokenize(tok, text), tok.bos_token_id
    else:
        text, bos = "random tokens", 1
        stream = torch.randint(3, PRESET["vocab"], (tokens,), generator=torch.Generator().manual_seed(0))
    return PreparedCorpus(TextSource("bench", text, "bench", protocol), make_windows(stream, protocol, bos))


def evaluate(model_dir: Path, adapters: list[Path], corpus, one_base: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from llamafactory_macdrop.analysis.attack.attacks import AttackSetting, AttackTargets
    from llamafactory_macdrop.analysis.compare.evaluation import OneBaseEvaluator
    from llamafactory_macdrop.core.locator import locate_massive_weights

    settings = [AttackSetting("none"), AttackSetting("zero", 5)]

    def evaluator():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        located = locate_massive_weights(model, 5)
        return OneBaseEvaluator(
            model,
            str(model_dir),
            AttackTargets(located.layer, located.indices),
            settings,
            [corpus],
            progress=False,
            echo=None,
        )

    items, swap, evals, loads = [], [], [], []
    with Clock() as total:
        ev = None
        for adapter in adapters:
            if ev is None or not one_base:
                t0 = time.perf_counter()
                ev = evaluator()
                loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            items.append(ev.evaluate(adapter, adapter.name))
            evals.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ev.verify_base()
        fingerprint_s = time.perf_counter() - t0
        if one_base:  # attach + unload alone, once per adapter, without evaluating
            from llamafactory_macdrop.analysis.models.loading import attach_adapter

            for adapter in adapters:
                t0 = time.perf_counter()
                ev.base = attach_adapter(ev.base, adapter).unload()
                swap.append(time.perf_counter() - t0)
    return {
        "seconds": total.seconds,
        "items": items,
        "load_s": loads,
        "eval_s": evals,
        "swap_s": swap,
        "fingerprint_s": fingerprint_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("cpu",), default="cpu")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--text-file", type=Path, default=None)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    benchlib.set_threads(args.threads)
    machine = benchlib.machine("cpu")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-compare-"))
    model_dir = args.model or benchlib.build_llama(work / "llama_cpu_origin2", origin_layer=2, **PRESET)
    adapters = make_adapters(model_dir, work / "adapters", args.adapters)
    data = corpus(model_dir, args.text_file, args.tokens)
    evaluate(model_dir, adapters[:1], data, True)  # warm-up
    pairs = benchlib.alternate(
        {
            "one_base": lambda: evaluate(model_dir, adapters, data, True),
            "reload": lambda: evaluate(model_dir, adapters, data, False),
        },
        args.repeats,
    )
    identical = all(p["one_base"]["items"] == p["reload"]["items"] for p in pairs)
    for p in pairs:
        p["ratio"] = p["reload"]["seconds"] / p["one_base"]["seconds"]
        for arm in ("one_base", "reload"):
            p[arm].pop("items")
    rec = benchlib.finish_record(
        {
            **machine,
            "benchmark": "compare_eval",
            "model": str(model_dir),
            "adapters": args.adapters,
            "windows": data.windows.count,
            "settings": ["none", "zero k=5"],
            "pairs": pairs,
            "identical_items": identical,
            "median_ratio": median(p["ratio"] for p in pairs),
            "one_base_s": median(p["one_base"]["seconds"] for p in pairs),
            "reload_s": median(p["reload"]["seconds"] for p in pairs),
            "load_s": median(x for p in pairs for x in p["reload"]["load_s"]),
            "eval_per_adapter_s": median(x for p in pairs for x in p["one_base"]["eval_s"]),
            "swap_s": median(x for p in pairs for x in p["one_base"]["swap_s"]),
            "fingerprint_s": median(p["one_base"]["fingerprint_s"] for p in pairs),
        }
    )
    print(benchlib.describe(rec))
    print(
        f"{args.adapters} adapters x 2 settings x {data.windows.count} windows: one base {rec['one_base_s']:.2f} s, "
        f"reload per adapter {rec['reload_s']:.2f} s -> {rec['median_ratio']:.2f}x; items identical: {identical}"
    )
    print(
        f"per adapter: load {rec['load_s']:.2f} s, attach+unload {rec['swap_s']:.3f} s, evaluation "
        f"{rec['eval_per_adapter_s']:.2f} s; base fingerprint (SHA-256 of every tensor) {rec['fingerprint_s']:.2f} s"
    )
    benchlib.write_json(args.json, rec)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
