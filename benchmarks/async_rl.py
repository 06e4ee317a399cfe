"""Asynchronous RL on Ray against synchronous, and the Ray launcher against one process: GRPO on the
built-in task from an SFT model, one run each, on this machine's cores.

    python benchmarks/async_rl.py [--steps 20] [--prompts 32] [--group 8] [--cores 2]

Runs (all GRPO, same seeds, data and batch; the SFT model is trained once and cached):

- ``local``: launcher=local, ``--cores`` threads.
- ``ray_k0``: launcher=ray, one rollout worker, max_staleness 0. Generation and training alternate;
  the worker and the learner have ``--cores`` threads each.
- ``ray_k1`` / ``ray_k2``: max_staleness 1 / 2. Generation and training run at once, with the same
  threads as ``ray_k0`` (``--async-worker-threads`` gives the worker fewer): the decode loop of a small
  model leaves cores idle that the learner fills.

Each run is repeated ``--repeats`` times, interleaved, and the median steps/s is kept (a busy
machine shows up as spread, reported). Step time is the sum of ``step_s`` over the run (sampling, scoring, reference pass, update; not the
held-out evaluations, which every run does alike). The learning curve is held-out accuracy (64 prompts
x 4 samples) every ``--eval-every`` steps against that time. Ray binds to the machine's network
address, so the script re-runs itself in a private network namespace (``unshare -n``, as root) when it
is not in one. The last line printed is one JSON object with ``async_speedup`` (k=1 steps/s over k=0),
``async_speedup_k2``, ``ray_overhead`` (ray k=0 step time over local) and each run's final accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def only_loopback() -> bool:
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return {line.split(":")[0].strip() for line in lines} <= {"lo"}


def posttrain(args: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, env=env,
                         timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"posttrain {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def sft_policy() -> str:
    """The built-in task's SFT model (as the RL tests train it), cached."""
    cache = Path(os.environ.get("POSTTRAIN_CACHE", ROOT / ".cache" / "posttrain")) / "bench-async-sft"
    if not (cache / "final" / "model.safetensors").exists():
        posttrain(["sft", "model.name_or_path=tiny", "train.epochs=2", "data.eval=null", "task_eval=false",
                   "train.progress=false", f"train.output_dir={cache}"], 2)
    return str(cache / "final")


def run(name: str, policy: str, out: Path, args, extra: list[str], threads: int) -> dict:
    run_dir = out / name
    posttrain(["grpo", f"model.name_or_path={policy}", f"train.output_dir={run_dir}", "reward=builtin_correct",
               f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
               f"train.max_steps={args.steps}", "train.lr=1e-4", f"train.eval_every={args.eval_every}",
               "task_eval_prompts=64", "task_eval_samples=4", "train.progress=false", *extra], threads)
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clock, curve, step_s = 0.0, [], []
    for r in rows:
        if "step_s" in r:
            clock += r["step_s"]
            step_s.append(r["step_s"])
        if "eval/accuracy" in r:
            curve.append([round(clock, 2), r["eval/accuracy"]])
    total = sum(step_s)
    res = {"steps_per_s": len(step_s) / total, "step_s": total / len(step_s), "final_accuracy": curve[-1][1],
           "initial_accuracy": curve[0][1], "curve": curve,
           "gen_s": sum(r.get("gen_s", 0.0) for r in rows) / len(step_s),
           "train_s": sum(r.get("train_s", 0.0) for r in rows) / len(step_s)}
    lag = [r["async/staleness_mean"] for r in rows if "async/staleness_mean" in r]
    if lag:
        res["staleness_mean"] = sum(lag) / len(lag)
    print(f"{name}: {json.dumps(res)}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--async-worker-threads", type=int, default=0, help="0 = --cores")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default="local,ray_k0,ray_k1,ray_k2")
    args = ap.parse_args()
    if not only_loopback():
        if os.geteuid() != 0:
            raise SystemExit("run as root (the script enters a private network namespace for Ray), or start it "
                             "inside one: unshare -n bash -c 'ip link set lo up; python benchmarks/async_rl.py'")
        cmd = " ".join([sys.executable, str(Path(__file__).resolve()), *map(str, sys.argv[1:])])
        raise SystemExit(subprocess.call(["unshare", "-n", "bash", "-c", f"ip link set lo up && exec {cmd}"]))

    policy = sft_policy()
    c, wt = args.cores, args.async_worker_threads or args.cores
    ray = ["launcher=ray", "ray.rollout_workers=1"]
    runs = {"local": ([], c),
            "ray_k0": ([*ray, f"ray.cpus_per_worker={c}"], c),
            "ray_k1": ([*ray, f"ray.cpus_per_worker={wt}", "async.max_staleness=1"], c),
            "ray_k2": ([*ray, f"ray.cpus_per_worker={wt}", "async.max_staleness=2"], c)}
    result: dict = {"benchmark": "async_rl", "steps": args.steps, "prompts_per_step": args.prompts,
                    "group_size": args.group, "cores": c, "async_worker_threads": wt, "repeats": args.repeats}
    names = args.only.split(",")
    trials: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name in names:
                extra, threads = runs[name]
                trials[name].append(run(name, policy, Path(tmp) / str(rep), args, extra, threads))
    for name, ts in trials.items():
        ts.sort(key=lambda t: t["steps_per_s"])
        result[name] = {**ts[len(ts) // 2], "steps_per_s_all": [round(t["steps_per_s"], 3) for t in ts]}
    r = result
    if "ray_k0" in r and "ray_k1" in r:
        r["async_speedup"] = r["ray_k1"]["steps_per_s"] / r["ray_k0"]["steps_per_s"]
    if "ray_k0" in r and "ray_k2" in r:
        r["async_speedup_k2"] = r["ray_k2"]["steps_per_s"] / r["ray_k0"]["steps_per_s"]
    if "ray_k0" in r and "local" in r:
        r["ray_overhead"] = r["ray_k0"]["step_s"] / r["local"]["step_s"]
    r["final_accuracy"] = {k: r[k]["final_accuracy"] for k in runs if k in r}
    print(json.dumps(r))


if __name__ == "__main__":
    main()
