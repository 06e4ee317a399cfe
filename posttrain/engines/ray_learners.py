"""The learner group of ``launcher=ray``: M training ranks as Ray actors, one torch.distributed group.

With ``ray.learners=1`` the learner is the controller process itself. With M > 1 the controller
(:func:`launch_learners`) starts M :class:`Learner` actors, each reserving ``ray.cpus_per_learner`` CPUs
and ``ray.gpus_per_learner`` GPUs; they form one torch.distributed group (the environment torchrun would
give: RANK, WORLD_SIZE, MASTER_ADDR of rank 0's node, a free port) and each runs the command's own
``run(cfg)``, so DDP and FSDP2 (``train.strategy``) work exactly as under torchrun.

Rank 0 drives the rollout workers; every rank sees them through a :class:`GroupRolloutEngine`: its
share of each request is gathered to rank 0, sent to the workers as one request, and the rollouts are
scattered back. Weights go from rank 0 only (the ranks hold the same policy). Each prompt keeps its own
seed, so the samples are those a single process would draw. Reward workers (``ray.reward_workers``) are
rank 0's too; every rank scores through a :class:`GroupScorer` the same way.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace

import torch
import torch.distributed as dist

from posttrain.engines.rollout import prompt_seeds
from posttrain.errors import ConfigError, PosttrainError, TrainingError


# ----------------------------------------------------------------------------- the ranks' view of the workers


class GroupRolloutEngine:
    """A training rank's rollout engine when rank 0 drives the engine for all (``inner`` on rank 0, None
    elsewhere): the Ray rollout workers, or (``launcher=local`` with several processes) the completion
    servers of ``rollout.engine=server``, whose weights one process reloads. Every rank must call
    ``submit``/``collect``/``generate`` together, as the online loop does; ``main_engine`` is rank 0's own
    engine (held-out evaluation runs there alone). An ``inner`` without ``submit`` generates in ``collect``."""

    def __init__(self, inner, rank: int, world: int):
        self.inner, self.rank, self.world = inner, rank, world
        self._version, self.restarts, self.last_stats = -1, 0, {}
        self.oldest_version = None  # the oldest weights version in the last collected request, every rank

    @property
    def main_engine(self):
        return self.inner

    @property
    def version(self) -> int:
        return self.inner.version if self.inner is not None else self._version

    def update_weights(self, model, version: int | None = None) -> None:
        if self.inner is not None:
            self.inner.update_weights(model, version)
        else:
            self._version = self._version + 1 if version is None else version

    def submit(self, prompts, params):
        parts = [None] * self.world
        dist.all_gather_object(parts, (list(prompts), params))
        if self.rank != 0:
            return [len(p) for p, _ in parts]
        seeds = [s for p, prm in parts for s in prompt_seeds(prm, len(p))]
        merged, prompts = replace(parts[0][1], seeds=seeds, seed=None), [q for p, _ in parts for q in p]
        request = self.inner.submit(prompts, merged) if hasattr(self.inner, "submit") else (prompts, merged)
        return [len(p) for p, _ in parts], request

    def collect(self, pending):
        payload = [None] * self.world
        if self.rank == 0:
            sizes, request = pending
            outs = self.inner.collect(request) if hasattr(self.inner, "collect") else self.inner.generate(*request)
            k = len(outs) // max(sum(sizes), 1)  # rollouts per prompt
            bounds = [0]
            for s in sizes:
                bounds.append(bounds[-1] + s * k)
            oldest = min((o.version for o in outs if o.version is not None), default=None)
            restarts, stats = getattr(self.inner, "restarts", 0), getattr(self.inner, "last_stats", {})
            payload = [(outs[a:b], restarts, stats, oldest)
                       for a, b in zip(bounds, bounds[1:])]
        mine = [None]
        dist.scatter_object_list(mine, payload if self.rank == 0 else None, src=0)
        outs, self.restarts, self.last_stats, self.oldest_version = mine[0]
        return outs

    def generate(self, prompts, params):
        return self.collect(self.submit(prompts, params))

    def worker_table(self):
        return self.inner.worker_table() if hasattr(self.inner, "worker_table") else None

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


class GroupScorer:
    """A learner rank's reward scoring when rank 0 holds the Ray reward workers (``inner``, a
    :class:`~posttrain.engines.ray_rewards.RayRewardWorkers`; None elsewhere). Called like it, by every rank
    together (each rank scores its batch of every step, as the online loop does): the ranks' batches are
    gathered to rank 0, each is scored there (shared between the workers), and each rank gets back the raw
    components and outcome counts of its own batch, as if it had scored it itself."""

    def __init__(self, inner, rank: int, world: int):
        self.inner, self.rank, self.world = inner, rank, world
        self.last_stats, self.restarts = None, 0

    def __call__(self, prompts: list, texts: list[str], columns: dict[str, list], step: int | None = None) -> dict:
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object((list(prompts), list(texts), columns), parts, dst=0)
        payload = None
        if self.rank == 0:
            payload = []
            for p, t, c in parts:  # one batch at a time: the outcome counts are then each rank's own
                raw = self.inner(p, t, c, step)
                payload.append((raw, self.inner.last_stats, self.inner.restarts))
        mine = [None]
        dist.scatter_object_list(mine, payload, src=0)
        raw, self.last_stats, self.restarts = mine[0]
        return raw

    @property
    def metrics(self) -> dict[str, float]:
        return {"async/reward_restarts": float(self.restarts)}

    def worker_table(self):
        return self.inner.worker_table() if self.inner is not None else None

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


# ----------------------------------------------------------------------------- the learner actors


class Learner:
    """One training rank (run as a Ray actor)."""

    def __init__(self, rank: int, world: int, threads: int):
        self.rank, self.world = rank, world
        torch.set_num_threads(max(1, threads))

    def address(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0's rendezvous point."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, run_fn, cfg, addr: str, port: int):
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=addr, MASTER_PORT=str(port), POSTTRAIN_RAY_LEARNER="1")
        return run_fn(cfg)


def in_learner_group() -> bool:
    return os.environ.get("POSTTRAIN_RAY_LEARNER") == "1"


def launch_learners(cfg, run_fn):
    """Run ``run_fn(cfg)`` on ``cfg.ray.learners`` Learner actors (one torch.distributed group); return
    rank 0's result. A rank's error stops the others and is raised here."""
    import ray

    from posttrain.engines.ray_engine import start_ray

    r = cfg.ray
    started = start_ray(r.address, r.learners * r.cpus_per_learner + r.rollout_workers * r.cpus_per_worker
                        + r.reward_workers * r.cpus_per_reward_worker)
    actor = ray.remote(num_cpus=r.cpus_per_learner, num_gpus=r.gpus_per_learner)(Learner)
    learners = [actor.remote(rank, r.learners, int(r.cpus_per_learner)) for rank in range(r.learners)]
    try:
        try:  # every learner placed and started before any of them waits at the rendezvous
            addr, port = ray.get([a.address.remote() for a in learners], timeout=r.call_timeout_s)[0]
        except ray.exceptions.GetTimeoutError:
            raise TrainingError(f"the {r.learners} learner actors did not all start within ray.call_timeout_s="
                                f"{r.call_timeout_s:g} s", where="ray.learners",
                                fix="the cluster may lack the resources asked for: ray.cpus_per_learner / "
                                    "ray.gpus_per_learner x ray.learners (see `ray status`)") from None
        refs = [a.run.remote(run_fn, cfg, addr, port) for a in learners]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, PosttrainError) else
                       TrainingError(f"learner rank {refs.index(done[0])} failed: {e}")) from None
            except ray.exceptions.RayActorError as e:
                raise TrainingError(f"learner rank {refs.index(done[0])} died: {e}",
                                    fix="look at its log above (out of memory?); resume with train.resume=true") from None
        return ray.get(refs[0])
    finally:
        for a in learners:
            ray.kill(a)
        if started:
            ray.shutdown()


def check_group(cfg, world_size: int) -> None:
    """launcher=ray runs as one process (ray.learners=1) or as the learner group launch_learners starts."""
    r = cfg.ray
    if r.learners == 1 and world_size > 1:
        raise ConfigError(f"launcher=ray with ray.learners=1 trains in the controller process, and this run has "
                          f"{world_size} processes", where="ray.learners",
                          fix=f"start it as one process with ray.learners={world_size} (the learners are then Ray "
                              "actors), or use launcher=local under torchrun")
    if r.learners > 1 and not (in_learner_group() and world_size == r.learners):
        raise ConfigError(f"ray.learners={r.learners} runs the learners as Ray actors, which the posttrain "
                          "command line starts", where="ray.learners",
                          fix="run it with `posttrain <command> ... launcher=ray ray.learners=N`, or from Python "
                              "with posttrain.engines.ray_learners.launch_learners(cfg, run)")
