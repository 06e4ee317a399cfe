"""Helpers shared by the benchmarks: peak memory, timing, subprocess workers, data.

Each trainer runs in its own subprocess so its peak RSS is its own; a worker prints one JSON line last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: ``getrusage`` (Linux reports KiB; macOS
    bytes); psutil's peak working set where ``resource`` does not exist (Windows)."""
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 2**20 if sys.platform == "darwin" else kb / 1024
    except ImportError:
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20


class StepClock:
    """Timestamps of finished steps; rate over the steps after ``warmup``."""

    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def rate(self, items_per_step: int) -> float:
        steps = len(self.times) - self.warmup
        if steps <= 0:
            raise RuntimeError(f"only {len(self.times)} steps timed; need more than the {self.warmup} warm-up steps")
        return steps * items_per_step / (self.times[-1] - self.times[self.warmup - 1])


def run_worker(script: str, worker: str, args: list[str], timeout: int = 1800, threads: int | None = None) -> dict:
    """Run ``python script --worker NAME ...`` in a fresh process; its last stdout line is JSON.
    ``threads`` pins OMP/MKL threads (on a shared machine, more threads than free cores make OpenMP
    barriers spin: 2 threads measured 5x slower than 1 under load)."""
    cmd = [sys.executable, script, "--worker", worker, *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"{worker} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_peak_gflops(n: int = 1024, reps: int = 20) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def bf16_available() -> bool:
    """AVX-512 bf16 (or AMX) on this CPU: where bf16 autocast pays off."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def preference_records(n: int, seed: int = 2) -> list[dict]:
    from posttrain.tasks import builtin

    return builtin.gold_preference_records(n, seed=seed)


def trl_text_rows(tokenizer, records: list[dict]) -> list[dict]:
    """Standard-format (text) rows whose tokenization equals ours: the prompt rendered with the chat
    template up to the assistant header, responses ending in the end-of-turn (EOS) token."""
    from posttrain.data.chat import as_messages, ensure_template

    ensure_template(tokenizer)
    out = []
    for r in records:
        prompt = tokenizer.apply_chat_template(as_messages(r["prompt"], "user"), tokenize=False,
                                               add_generation_prompt=True)
        out.append({"prompt": prompt, "chosen": r["chosen"] + tokenizer.eos_token,
                    "rejected": r["rejected"] + tokenizer.eos_token})
    return out


def interleaved(script: str, workers: list[str], args: list[str], repeats: int, threads: int | None) -> dict[str, dict]:
    """Run every worker ``repeats`` times, interleaved (a, b, c, a, b, c, ...), so load from other
    processes hits all of them alike; per worker keep the run with the highest throughput (the least
    disturbed), the highest peak RSS seen, and every rate (``all_pairs_per_s``)."""
    runs: dict[str, list[dict]] = {w: [] for w in workers}
    for _ in range(repeats):
        for w in workers:
            runs[w].append(run_worker(script, w, args, threads=threads))
    out = {}
    for w, rs in runs.items():
        best = dict(max(rs, key=lambda r: r["pairs_per_s"]))
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        best["all_pairs_per_s"] = [round(r["pairs_per_s"], 2) for r in rs]
        out[w] = best
    return out


def posttrain(*args: str) -> None:
    """``posttrain ARGS`` in a subprocess (offline); exits with its output tails if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"posttrain {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def cached(path: Path, *args: str) -> str:
    """final/ of ``posttrain ARGS train.output_dir=path``, trained only if not there yet."""
    if not (path / "final" / "model.safetensors").exists():
        posttrain(*args, f"train.output_dir={path}")
    return str(path / "final")
