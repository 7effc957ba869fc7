"""Shared pieces of the benchmark scripts: the random model, A/B alternation, memory, the record.

Every figure is a RATIO of two arms measured in one run, alternating the order pair by pair
(A B, B A, A B, ...), reported as the median over pairs: on a shared machine a burst of foreign
load then hits both arms of a pair, and the median drops the pairs it spoiled. Absolute times are
kept as context only. The record (machine, CPU model, cores, versions, date, load average before
and after) goes next to every figure.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]


# ----------------------------------------------------------------------------- the model
def build_llama(
    out: Path,
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    vocab: int,
    dtype: str = "float32",
    origin_layer: int | None = None,
    kv_heads: int | None = None,
    device: str = "cpu",
) -> Path:
    """A random-init Llama saved as safetensors (once: an existing folder is reused).

    ``origin_layer`` plants a massive activation there the way real models have one (the BOS
    embedding carries a large value in hidden dim 0; five rows of W_gate/W_up at that layer read
    it with large gains and W_down writes the result into dim 1), so the layer-by-layer locator
    can stop after it as it does on real checkpoints. Without it no layer qualifies and every
    layer is read (the streaming loader's worst case). ``kv_heads``: grouped-query attention;
    ``device``: where the random init runs (``cuda`` initializes 8 B weights much faster).
    """
    import torch
    from helpers import tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tiny.build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if origin_layer is not None:
        with torch.no_grad():
            model.model.embed_tokens.weight[1, 0] = 5.0
            mlp = model.model.layers[origin_layer].mlp
            rows = torch.tensor([7, 300, 41, 512, 99]) % intermediate
            mlp.gate_proj.weight[rows, 0] = 1.0
            mlp.up_proj.weight[rows, 0] = torch.tensor([100.0, 85.0, 70.0, 55.0, 40.0])
            mlp.down_proj.weight[:, rows] = 0.0
            mlp.down_proj.weight[1, rows] = 1.0
    model.to(getattr(torch, dtype)).save_pretrained(out)
    return out


def model_params(cfg: dict) -> int:
    return (
        cfg["layers"] * (4 * cfg["hidden"] ** 2 + 3 * cfg["hidden"] * cfg["intermediate"])
        + 2 * cfg["vocab"] * cfg["hidden"]
    )


def warm_page_cache(folder: Path) -> int:
    """Read every file of ``folder`` once so that no arm pays the first (cold) disk read."""
    total = 0
    for p in sorted(folder.glob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
    return total


# ----------------------------------------------------------------------------- A/B
def alternate(arms: dict[str, Callable[[], dict]], repeats: int, log: Callable[[str], None] = print) -> list[dict]:
    """Run the arms (two, or more) ``repeats`` times, the order flipped every round; one dict per
    round (``{arm: result}``); each result must carry ``seconds``."""
    names = list(arms)
    assert len(names) >= 2
    pairs = []
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        pair = {}
        for name in order:
            pair[name] = arms[name]()
            log(f"[bench] pair {r + 1}/{repeats} {name:>10s}: {pair[name]['seconds']:.3f} s")
        pairs.append(pair)
    return pairs


def median(values) -> float:
    return statistics.median(list(values))


# ----------------------------------------------------------------------------- memory (CPU)
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_anon_bytes() -> int:
    """Resident anonymous memory (what the process allocated itself; file-backed pages of
    memory-mapped checkpoints are excluded: the kernel may drop and re-read those)."""
    return _status_kib("RssAnon") * 1024


class AnonPeak:
    """Peak of :func:`rss_anon_bytes` while the block runs, sampled every ``period`` seconds by a
    thread (Linux has no high-water mark for anonymous memory alone; tensors live much longer
    than a millisecond, so the sampling misses nothing that matters here)."""

    def __init__(self, period: float = 0.001) -> None:
        self.period, self.peak = period, 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            self._stop.wait(self.period)

    def __enter__(self) -> "AnonPeak":
        import threading

        self.peak = rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (or since the process started)."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def set_threads(n: int | None) -> None:
    """Pin torch's CPU threads (also for the fresh processes: OMP_NUM_THREADS is inherited). With
    other jobs on a 2-core machine one thread per process keeps a pair's two arms comparable:
    two threads that wait for each other at every operator slow down erratically when one of them
    loses its core."""
    if n:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the record
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """Machine, versions, date and load average: written next to every figure."""
    import torch
    import transformers

    rec = {
        "date": date.today().isoformat(),
        "host_cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    return rec


def finish_record(rec: dict) -> dict:
    rec["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return rec


def describe(rec: dict) -> str:
    v = rec["versions"]
    return (
        f"{rec['date']}, {rec['device'] if rec['device'] != 'cpu' else rec['host_cpu']}, {rec['cpu_cores']} cores "
        f"({rec['torch_threads']} torch threads), torch {v['torch']}, transformers {v['transformers']}, "
        f"python {v['python']}; load average {rec['loadavg_1m_start']} -> {rec.get('loadavg_1m_end')}"
    )


def write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1) + "\n")
        print(f"written to {path}")


class Clock:
    """``with Clock() as c: ...; c.seconds`` (synchronizing CUDA at both ends when asked)."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def __enter__(self) -> "Clock":
        self._sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.t0
