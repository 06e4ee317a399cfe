"""Reward workers as Ray actors: ``launcher=ray`` with ``ray.reward_workers=N``.

Each of the N actors builds the run's reward functions itself from the config (``build()``, the
learner's own builder: a reward model ``rm:PATH`` loads inside the worker, never pickled from the
learner). A step's batch of (prompts, completions, row columns) is split between the workers in order;
each returns the raw components ``{name: [value or None]}`` of its share and the learner joins them in
order, then shapes, weights and checks them exactly as when it scores itself
(``ExperienceMaker.score``), so the numbers are the learner's own.

- **Faults.** A worker that dies is replaced by a new one (it builds the rewards again) and its share
  is scored again, so no completion is lost or scored twice; at most ``ray.max_restarts`` reward
  workers are replaced in a run (a budget of their own, apart from the rollout workers'). A worker that
  does not answer within ``ray.call_timeout_s`` stops the run with an error naming it, its process and
  what it was doing.
- **Metrics.** ``worker_table()``: per worker the completions scored and the seconds spent scoring.
"""

from __future__ import annotations

import os
import time
import weakref

import torch

from posttrain.engines.ray_engine import ray_get, start_ray
from posttrain.engines.runlog import say
from posttrain.errors import DataError, ServiceError


def score_components(rewards, prompts: list, texts: list[str], columns: dict[str, list], step=None) -> dict:
    """Raw components ``{name: list}`` of ``rewards`` ((name, fn, weight) triples) on one batch: what the
    learner computes when it scores itself, and what each reward worker computes on its share. ``step``
    is unused here (the signature of ``ExperienceMaker.score_raw``)."""
    return {name: list(fn(prompts, texts, **columns)) for name, fn, _ in rewards}


def split(n: int, k: int) -> list[tuple[int, int, int]]:
    """(worker, lo, hi) of the non-empty shares of ``n`` completions over ``k`` workers, in order."""
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]


def merge(parts: list[dict], sizes: list[int]) -> dict:
    """Join the shares' raw components in order; a share whose reward returned the wrong number of values
    is an error here (after joining, a short list would shift every later completion's score)."""
    names = list(parts[0]) if parts else []
    for raw, n in zip(parts, sizes):
        if list(raw) != names:
            raise ServiceError(f"reward workers returned different rewards: {names} and {list(raw)}",
                               fix="a reward built from the same config must have the same names everywhere")
        for name, vals in raw.items():
            if len(vals) != n:
                raise DataError(f"reward '{name}' returned {len(vals)} values for {n} completions",
                                where=f"reward {name}",
                                fix="a reward function returns one float (or None) per completion")
    return {name: [v for raw in parts for v in raw[name]] for name in names}


class RewardWorker:
    """One reward worker (run as a Ray actor): the run's reward functions, built in this process."""

    def __init__(self, index: int, build, threads: int):
        torch.set_num_threads(max(1, threads))
        self.index, self.rewards = index, build()

    def pid(self) -> int:
        return os.getpid()

    def score(self, prompts: list, texts: list[str], columns: dict[str, list]):
        t0 = time.perf_counter()
        raw = score_components(self.rewards, prompts, texts, columns)
        stats = {name: dict(getattr(fn, "last_stats", None) or {}) for name, fn, _ in self.rewards}
        return raw, stats, time.perf_counter() - t0

    def close(self) -> None:
        for _, fn, _ in self.rewards:  # e.g. verifier process pools, which would outlive a killed actor
            if hasattr(fn, "close"):
                fn.close()


_LIVE: "weakref.WeakSet[RayRewardWorkers]" = weakref.WeakSet()  # clients of this process not closed yet


class RayRewardWorkers:
    """``RayRewardWorkers(build, cfg)``: ``cfg`` is a :class:`~posttrain.rollouts.config.RayConfig`;
    ``build()`` returns the run's rewards as (name, fn, weight) triples (it runs inside each worker).
    Called as ``score_raw(prompts, texts, columns, step)`` it returns the raw components of the batch."""

    def __init__(self, build, cfg, worker_cls=RewardWorker):
        import ray

        self.cfg, self._ray, self._build = cfg, ray, build
        for other in list(_LIVE):  # a run that ended in an error in this process leaves its workers: end them
            other.close()         # (first: one that started the cluster stops it)
        self._started = start_ray(cfg.address, cfg.reward_workers * cfg.cpus_per_reward_worker)
        _LIVE.add(self)
        self._actor = ray.remote(num_cpus=cfg.cpus_per_reward_worker, num_gpus=cfg.gpus_per_reward_worker)(worker_cls)
        n = cfg.reward_workers
        self.workers, self.pids = [None] * n, [0] * n
        self.restarts, self.last_stats = 0, None
        self._scored, self._busy = [0] * n, [0.0] * n
        for i in range(n):
            self._start(i)

    def _start(self, i: int) -> None:
        actor = self._actor.remote(i, self._build, int(self.cfg.cpus_per_reward_worker))
        try:  # the constructor builds the rewards (a reward model loads): bounded like any call
            self.pids[i] = self._get(actor.pid.remote(), i, "starting (building the reward functions)")
        except self._ray.exceptions.RayActorError as e:  # its constructor failed: a restart would fail alike
            self._kill(actor)
            raise ServiceError(f"reward worker {i} could not start: {e}",
                               fix="the rewards must build in a worker process as in the learner: a module:function "
                                   "reward must be importable there (a file path, or on PYTHONPATH)") from None
        self.workers[i] = actor

    def _kill(self, actor) -> None:
        try:
            self._ray.kill(actor)
        except Exception:  # already gone, or the cluster is
            pass

    def _replace(self, i: int, actor, doing: str) -> None:
        """Worker ``i`` died while ``doing``: start a new one (unless that happened already)."""
        if self.workers[i] is not actor:
            return
        if self.restarts >= self.cfg.max_restarts:
            raise ServiceError(f"reward worker {i} (pid {self.pids[i]}) died while {doing}, and ray.max_restarts="
                               f"{self.cfg.max_restarts} reward workers were already restarted in this run",
                               fix="look at the worker's log above (out of memory?); raise ray.max_restarts")
        self.restarts += 1
        self._kill(actor)  # dead or unreachable: its resources go back to the cluster
        say(f"reward worker {i} (pid {self.pids[i]}) died while {doing}; starting a new one ({self.restarts} of "
            f"ray.max_restarts={self.cfg.max_restarts}) and scoring its share again")
        self._start(i)

    def _get(self, ref, i: int, doing: str):
        """``ray.get`` within ``ray.call_timeout_s``, errors naming the worker; a worker's own posttrain error
        (a reward's DataError, say) is raised as is."""
        return ray_get(self._ray, ref, self.cfg.call_timeout_s, f"reward worker {i} (pid {self.pids[i]})", doing,
                       f"ray.call_timeout_s={self.cfg.call_timeout_s:g} s",
                       "a reward that hangs (a verifier without a timeout?): look at the worker's log above; raise "
                       "ray.call_timeout_s if it is only slow")

    def __call__(self, prompts: list, texts: list[str], columns: dict[str, list], step: int | None = None) -> dict:
        ray = self._ray
        shares = split(len(texts), len(self.workers))

        def send(i: int, a: int, b: int):
            return self.workers[i].score.remote(prompts[a:b], texts[a:b], {k: v[a:b] for k, v in columns.items()})

        refs = [(self.workers[i], send(i, a, b)) for i, a, b in shares]  # all shares at once, then wait
        parts, stats = [], {}
        for (i, a, b), (actor, ref) in zip(shares, refs):
            doing = f"scoring {b - a} completions" + ("" if step is None else f" for RL step {step + 1}")
            while True:
                try:
                    raw, st, busy = self._get(ref, i, doing)
                    break
                except ray.exceptions.RayActorError:
                    self._replace(i, actor, doing)
                    actor, ref = self.workers[i], send(i, a, b)  # its whole share again, nothing kept of it
            parts.append(raw)
            self._scored[i] += b - a
            self._busy[i] += busy
            for name, counts in st.items():  # outcome counts (reward/<name>_<outcome>_frac) of the whole batch
                tot = stats.setdefault(name, {})
                for k, v in counts.items():
                    tot[k] = tot.get(k, 0) + v
        self.last_stats = stats
        return merge(parts, [b - a for _, a, b in shares])

    @property
    def metrics(self) -> dict[str, float]:
        return {"async/reward_restarts": float(self.restarts)}

    def worker_table(self) -> list[dict]:
        """Per reward worker: completions scored and seconds spent scoring them."""
        return [{"worker": i, "pid": self.pids[i], "scored": self._scored[i], "busy_s": self._busy[i]}
                for i in range(len(self.workers))]

    def close(self) -> None:
        """Stop the workers (their rewards closed first, briefly), and the local cluster when this started it."""
        ray, live = self._ray, [w for w in self.workers if w is not None]
        self.workers = [None] * len(self.workers)
        _LIVE.discard(self)
        if not ray.is_initialized():
            return
        if live:
            try:
                ray.wait([w.close.remote() for w in live], num_returns=len(live), timeout=5)  # a hung one is killed
            except Exception:
                pass
        for w in live:
            self._kill(w)
        if self._started:
            ray.shutdown()
