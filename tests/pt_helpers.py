"""Helpers shared by test files (a uniquely named module: several conftest.py files exist)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, env=None, timeout=600):
    """Run ``python -m posttrain.cli ...`` in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def undocumented_metrics(run_dirs) -> set[str]:
    """Metric names in the runs' metrics.jsonl that docs/metrics.md does not define.

    `train/` and `eval/` prefixes are stripped (the docs define the bare name); a family such as
    `reward/<component>` is documented by a backticked `reward/<` entry."""
    import json
    import re

    docs = (ROOT / "docs" / "metrics.md").read_text()
    names = set(re.findall(r"`([^`]+)`", docs))
    missing = set()
    for d in run_dirs:
        path = Path(d) / "metrics.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            for key in json.loads(line):
                bare = re.sub(r"^(train|eval)/", "", key)
                if key == "step" or key in names or bare in names:
                    continue
                family = bare.split("/")[0] + "/<"
                if any(n.startswith(family) for n in names):
                    continue
                missing.add(key)
    return missing


def text_length_reward(prompts, completions, **columns):
    """A reward that differs between a random model's samples (its text length), so group advantages
    are nonzero and an update moves the policy."""
    return [len(c) / 10 for c in completions]


class TwoTurnEnv:
    """A user environment for ``rollout.environment=pt_helpers:TwoTurnEnv``: the first turn gets a tool's
    answer (whatever it asked), the second ends the episode; each turn earns up to 0.5 for its length."""

    def __init__(self):
        self.turns = 0

    def reset(self, row: dict) -> list[dict]:
        self.turns = 0
        return [{"role": "user", "content": str(row["prompt"])}]

    def step(self, action: dict):
        from posttrain.rollouts.episodes import Step

        self.turns += 1
        reward = 0.5 * min(len(action.get("content") or ""), 8) / 8
        if self.turns == 1:
            calls = action.get("tool_calls") or [{"id": "call_0"}]
            return Step([{"role": "tool", "tool_call_id": calls[0].get("id", "call_0"), "content": "7"}], reward=reward)
        return Step([], reward=reward, done=True)


def noisy_copy(model_path: str, out: Path, scale: float = 0.05, seed: int = 0) -> Path:
    """``model_path`` with Gaussian noise on every weight, saved with its tokenizer to ``out``: a different
    model with the same tokenizer (a teacher, a second policy)."""
    import torch

    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(ModelConfig(name_or_path=model_path))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(out)
    load_tokenizer(model_path).save_pretrained(out)
    return out


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A rank of a two-process CPU run sometimes aborts in C++ ("terminate called without an active exception",
# SIGABRT), about 1 run in 8 of tests/rl/test_fsdp_rl.py here, with this project's code of before that
# change too: not understood yet. Such a run is started once more, from an empty output directory, and
# says so; any other failure is returned as it is.
_CXX_ABORT = "terminate called without an active exception"


def torchrun(*args, env=None, timeout=600):
    """``torchrun --nproc_per_node 2 -m posttrain.cli ...`` on loopback (really two processes, unlike the
    accelerate launchers with --cpu; a run's summary.json world_size proves it)."""
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "posttrain.cli", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                             env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        if out.returncode == 0 or _CXX_ABORT not in out.stderr or attempt:
            return out
        print(f"torchrun: a rank aborted ({_CXX_ABORT}); running it once more", file=sys.stderr)
        for a in args:
            if a.startswith("train.output_dir="):
                shutil.rmtree(a.split("=", 1)[1], ignore_errors=True)
    return out


def local_ray_cluster(num_cpus: int = 4):
    """A module's local Ray cluster (use as ``pytest.fixture(scope="module", autouse=True)(local_ray_cluster)``).
    Ray binds to the machine's network address whatever its options say, so the tests run only in a
    private network namespace whose one interface is loopback; elsewhere they are skipped, saying why."""
    import pytest
    import ray

    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]  # this process's network namespace
    if not {line.split(":")[0].strip() for line in lines} <= {"lo"}:
        pytest.skip("Ray binds to this machine's network address: run in a private network namespace "
                    "(scripts/test.sh does: unshare -n bash -c 'ip link set lo up; pytest -m ray')")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# Models trained once with the project's own commands and cached in $POSTTRAIN_CACHE/rl-fixtures, keyed
# by their configs and the source of the code that trains them, like the tiny model itself.
SFT_OVERRIDES = ["train.epochs=2", "data.eval=null", "task_eval=false", "train.progress=false"]
_SOURCES = ["posttrain/algorithms/sft.py", "posttrain/algorithms/reward.py", "posttrain/algorithms/collect.py",
            "posttrain/tasks/annotators.py", "posttrain/losses/sft.py",
            "posttrain/losses/reward.py", "posttrain/engines/train.py", "posttrain/tasks/builtin.py",
            "posttrain/models/tiny.py", "posttrain/models/heads.py", "posttrain/data/chat.py",
            "posttrain/data/batching.py"]


def _key(name: str, overrides: list[str]) -> str:
    h = hashlib.sha256(json.dumps([name, overrides]).encode())
    for rel in _SOURCES:
        p = ROOT / rel
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def cached_run(name: str, cls, run, overrides: list[str], out_key: str = "train.output_dir") -> Path:
    """Run a command once into $POSTTRAIN_CACHE/rl-fixtures/<name>-<key> (atomic rename); return it."""
    from posttrain.config import load_config

    cache = Path(os.environ["POSTTRAIN_CACHE"]) / "rl-fixtures"
    out = cache / f"{name}-{_key(name, overrides)}"
    if (out / "summary.json").exists():
        return out
    tmp = cache / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    run(load_config(cls, None, [f"{out_key}={tmp}", *overrides]))
    if not out.exists():
        os.replace(tmp, out)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def spawn_servers(model_path: str, logs: Path, n: int = 2) -> list[tuple[subprocess.Popen, str]]:
    """``python -m posttrain serve`` ``n`` times on free loopback ports; returns (process, base URL)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = []
    for i in range(n):
        log = open(logs / f"server{i}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "posttrain", "serve", f"model.name_or_path={model_path}", "port=0", "threads=1",
             "logprobs_mode=processed_logprobs", "log_level=info"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True), logs / f"server{i}.log"))
    out, deadline = [], time.monotonic() + 180
    for proc, log in procs:
        while not (m := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                for p, _ in procs:
                    p.kill()
                raise RuntimeError(f"posttrain serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        out.append((proc, m.group(1) + "/v1"))
    return out
