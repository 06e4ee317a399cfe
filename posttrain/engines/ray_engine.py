"""Rollout workers as Ray actors: the rollout engine of ``launcher=ray``.

The controller (the process that runs the command and trains) holds a :class:`RayRolloutEngine`; each
of ``ray.rollout_workers`` actors holds a rollout engine and its own copy of the policy: the local engine
samples from that copy; a vLLM engine or a server engine (worker i fronts servers i, i+N, ...) holds its
own weights, and the copy, kept on CPU, is what every update is loaded into the engine from.

- **Weights, versioned.** ``update_weights(model, version)`` puts the trainable parameters once in the
  object store (with LoRA the adapters only) and queues a load of that version on every worker. The
  next generation request first waits, at most ``ray.sync_timeout_s``, until every worker has loaded
  it; a worker that has not stops the run with an error naming it. Every result carries the version the
  worker sampled with, and a worker asked for a newer version than it holds refuses (never a silent
  sample from old weights). A worker whose engine holds its own weights reports a version only once the
  engine has it (its servers answered the reload). With ``ray.weight_sync=collective`` the weights are
  broadcast over a process group of this process and the workers instead (:mod:`posttrain.engines.weight_sync`).
- **Generation.** ``submit`` splits a request's prompts between the workers in order, each prompt with
  its own seed (``SamplingParams.seeds``), so the samples are those of the local engine whatever the
  number of workers; ``collect`` waits for them. ``generate`` is both. Submitting the next steps before
  training on this one is how the experience layer overlaps generation with training
  (``async.max_staleness``).
- **Faults.** A worker that dies is replaced (a new actor with the current weights) and its share of
  the prompts is sent again, at most ``ray.max_restarts`` times in a run; a worker that does not answer
  within ``ray.call_timeout_s`` stops the run with an error naming it, its process and what it was doing.
  An error inside a worker (its server died, no GPU for vLLM) stops the run naming the worker (and the
  server: the engine's own error); it is not a death, so nothing is restarted.
"""

from __future__ import annotations

import copy
import os
import time
import weakref
from dataclasses import dataclass, replace

import torch

from posttrain.engines.rollout import Rollout, SamplingParams, check_request, prompt_seeds
from posttrain.engines.runlog import say
from posttrain.engines.weight_sync import CollectiveSync, GroupReceiver
from posttrain.errors import PosttrainError, ServiceError


class RolloutWorker(GroupReceiver):
    """One rollout worker (run as a Ray actor): a rollout engine and its own copy of the policy
    (``join``/``receive``: weights over a process group, ``ray.weight_sync=collective``). ``own_weights``:
    the engine (vLLM, servers) holds its own weights, loaded from the copy after every update."""

    def __init__(self, index: int, model, make_engine, threads: int, version: int, own_weights: bool = False):
        from posttrain.models.attention import register

        register()  # the packed attention the trainer's model may name, in this process too
        torch.set_num_threads(max(1, threads))
        # Ray shows a worker with num_gpus > 0 its GPU(s) only; an engine with its own weights needs
        # the GPU for itself (vLLM), so the copy it is loaded from stays on CPU
        if torch.cuda.is_available() and not own_weights:
            model = model.to("cuda")
        self.index, self.model, self.version, self.own_weights = index, model, version, own_weights
        self.params = dict(model.named_parameters())
        self._make_engine, self.engine = make_engine, None

    def _named(self, e: PosttrainError) -> PosttrainError:
        return type(e)(f"rollout worker {self.index} (pid {os.getpid()}): {e.what}", where=e.where, fix=e.fix)

    def start(self) -> tuple[int, list[str], str]:
        """Build the engine here, not in ``__init__``: its errors (a server that does not answer, no GPU for
        vLLM) then reach the controller as themselves, naming this worker. Returns (pid, servers' URLs,
        the Ray node it runs on: address and node id)."""
        import ray

        try:
            self.engine = self._make_engine(self.model)
        except PosttrainError as e:
            raise self._named(e) from None
        node = f"{ray.util.get_node_ip_address()} {ray.get_runtime_context().get_node_id()[:8]}"
        return os.getpid(), [s.url for s in getattr(self.engine, "servers", [])], node

    def _publish(self, version: int) -> int:
        """The copy holds ``version``: an engine with its own weights loads it (a server engine pushes it
        to its servers and checks they report it) before the worker reports the version."""
        if self.own_weights:
            try:
                self.engine.update_weights(self.model, version)
            except PosttrainError as e:
                raise self._named(e) from None
        self.version = version
        return version

    def load(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        with torch.no_grad():
            for name, value in weights.items():
                self.params[name].copy_(value)
        return self._publish(version)

    def receive(self, version: int, gen: int, layout: list) -> int:
        held = self.version
        super().receive(version, gen, layout)
        self.version = held  # not until the engine has it too
        return self._publish(version)

    def generate(self, prompts: list[list[int]], params: SamplingParams, min_version: int):
        if self.version < min_version:
            raise ServiceError(f"rollout worker {self.index} (pid {os.getpid()}) holds weights version "
                               f"{self.version} but was asked to sample with version {min_version} or newer: "
                               "the learner's weights did not reach it")
        t0 = time.perf_counter()
        try:
            outs = self.engine.generate(prompts, params)
        except PosttrainError as e:
            raise self._named(e) from None
        for o in outs:
            o.version = self.version
        return outs, time.perf_counter() - t0

    def close(self) -> None:
        """Let the engine clean up (a server engine deletes its weight files) before the actor is killed."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


@dataclass
class _Job:
    worker: int
    actor: object             # the actor it was sent to (a replaced worker's jobs are sent again)
    lo: int                   # prompts[lo:hi] of the request
    hi: int
    params: SamplingParams
    ref: object


@dataclass
class Pending:
    """A submitted request: ``collect`` returns its rollouts."""

    prompts: list[list[int]]
    jobs: list[_Job]
    min_version: int
    loads: list                  # the weight loads queued before the jobs: (worker, actor, ref, version)
    ahead: list                  # generation requests queued before those loads


def start_ray(address: str | None, num_cpus: float) -> bool:
    """Connect to ``address``, or start a local cluster; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(num_cpus=max(num_cpus, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)
    return True


def ray_get(ray, ref, timeout: float, who: str, doing: str, limit: str, fix: str):
    """``ray.get(ref)`` within ``timeout`` seconds. A timeout, or a failure in the actor, is a ServiceError
    naming ``who`` and what it was ``doing`` (``limit``: the setting that bounds it, as text); a posttrain
    error raised in the actor is raised as is. An actor that died (RayActorError) is the caller's to handle."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ServiceError(f"{who} did not finish {doing} within {limit}", fix=fix) from None
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, PosttrainError):
            raise cause from None
        raise ServiceError(f"{who} failed while {doing}: {e}") from None


_LIVE: "weakref.WeakSet[RayRolloutEngine]" = weakref.WeakSet()  # engines of this process not closed yet


class RayRolloutEngine:
    """``RayRolloutEngine(model, make_engine, cfg)``: ``cfg`` is a :class:`~posttrain.rollouts.config.RayConfig`;
    ``make_engine(model)`` builds a worker's rollout engine (it runs inside the worker), or a list of them,
    one per worker (e.g. each with its own servers). ``own_weights``: those engines hold their own weights
    (vLLM, servers), loaded from the worker's CPU copy of the policy after every update."""

    def __init__(self, model, make_engine, cfg, worker_cls=RolloutWorker, *, own_weights: bool = False):
        import ray

        self.cfg, self._ray = cfg, ray
        for other in list(_LIVE):  # a run that ended in an error in this process leaves its workers: end them
            other.close()         # (first: one that started the cluster stops it)
        # a local cluster has room for the reward workers too (ray_rewards.py: they start after this engine)
        self._started = start_ray(cfg.address, cfg.rollout_workers * cfg.cpus_per_worker
                                  + cfg.reward_workers * cfg.cpus_per_reward_worker)
        src = getattr(model, "module", model)
        # NCCL needs the weights on a GPU at both ends and a whole GPU per worker; otherwise gloo, over CPU
        # buffers (workers whose engine holds its own weights keep their copy on CPU)
        gpu = any(p.device.type == "cuda" for p in src.parameters()) and cfg.gpus_per_worker >= 1 and not own_weights
        self._sync = CollectiveSync(self, "nccl" if gpu else "gloo") if cfg.weight_sync == "collective" else None
        if any(p.device.type != "cpu" for p in src.parameters()):  # workers may see no GPU, or another one
            src = copy.deepcopy(src).cpu()
        self._model_ref = ray.put(src)  # what a new or replaced worker starts from
        _LIVE.add(self)
        self._inflight: list[list] = [[] for _ in range(cfg.rollout_workers)]  # submitted, not collected
        n = cfg.rollout_workers
        self._makers = list(make_engine) if isinstance(make_engine, (list, tuple)) else [make_engine] * n
        self._own_weights = own_weights
        self._actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(worker_cls)
        self.version = -1                # the policy as shipped; update_weights numbers the rest
        self._weights_ref = None
        self._acks: list[tuple[int, object, object, int]] = []
        self.restarts, self.last_stats = 0, {}
        self._busy = [0.0] * cfg.rollout_workers
        self._tokens = [0] * cfg.rollout_workers
        self._t0 = time.perf_counter()
        self.workers, self.pids = [None] * cfg.rollout_workers, [0] * cfg.rollout_workers
        self.servers: list[list[str]] = [[] for _ in range(cfg.rollout_workers)]  # each worker's, if any
        self.nodes = [""] * cfg.rollout_workers  # where each worker runs (address, Ray node id)
        launched = []
        try:
            gpus, need = ray.cluster_resources().get("GPU", 0), cfg.gpus_per_worker * cfg.rollout_workers
            if need > gpus:  # the workers would wait for them until ray.call_timeout_s
                raise ServiceError(f"ray.rollout_workers={cfg.rollout_workers} x ray.gpus_per_worker="
                                   f"{cfg.gpus_per_worker:g} need {need:g} GPUs and the Ray cluster has {gpus:g}",
                                   where="ray.gpus_per_worker", fix="run on (or join with ray.address) a cluster "
                                   "with that many GPUs, use fewer workers or a fraction of a GPU each, or "
                                   "ray.gpus_per_worker=0 (rollout.engine=local or server)")
            launched = [self._launch(i) for i in range(cfg.rollout_workers)]  # engines built in parallel
            for i, started in enumerate(launched):
                self._start(i, started)
        except BaseException:
            for actor, _ in launched:  # started or still starting
                try:
                    ray.kill(actor)
                except Exception:  # already gone
                    pass
            self.close()  # and a cluster this engine started
            raise

    # ------------------------------------------------------------------ workers
    def _launch(self, i: int) -> tuple:
        actor = self._actor.remote(i, self._model_ref, self._makers[i], int(self.cfg.cpus_per_worker), -1,
                                   own_weights=self._own_weights)
        return actor, actor.start.remote()

    def _start(self, i: int, launched: tuple | None = None) -> None:
        actor, ref = launched or self._launch(i)
        try:
            self.pids[i], self.servers[i], self.nodes[i] = self._get(
                ref, "call_timeout_s", i, f"starting (it asked Ray for ray.cpus_per_worker={self.cfg.cpus_per_worker:g}"
                f" CPUs and ray.gpus_per_worker={self.cfg.gpus_per_worker:g} GPUs)")
        except PosttrainError:
            self._ray.kill(actor)  # its engine could not be built: the run stops here
            raise
        if self._sync is not None:  # the group forms again with this worker, which then receives the weights
            self._sync.stale = True
        elif self._weights_ref is not None:
            self._get(actor.load.remote(self.version, self._weights_ref), "sync_timeout_s", i,
                      f"loading weights version {self.version}")
        self.workers[i] = actor

    def _replace(self, i: int, actor, doing: str) -> None:
        """Worker ``i`` died while ``doing``: start a new one (unless that happened already)."""
        if self.workers[i] is not actor:
            return
        if self.restarts >= self.cfg.max_restarts:
            raise ServiceError(f"rollout worker {i} (pid {self.pids[i]}) died while {doing}, and "
                               f"ray.max_restarts={self.cfg.max_restarts} workers were already restarted in "
                               "this run", fix="look at the worker's log above (out of memory?); raise ray.max_restarts")
        self.restarts += 1
        try:
            self._ray.kill(actor)  # dead or unreachable: its resources go back to the cluster
        except Exception:
            pass
        say(f"rollout worker {i} (pid {self.pids[i]}) died while {doing}; starting a new one "
            f"({self.restarts} of ray.max_restarts={self.cfg.max_restarts}) and sending its prompts again")
        self._start(i)

    def _get(self, ref, limit: str, i: int, doing: str, timeout: float | None = None):
        """``ray.get`` within ``ray.<limit>`` seconds (or what is left of them: ``timeout``), errors naming
        the worker; a worker's own error is raised as is."""
        allowed = getattr(self.cfg, limit)
        servers = f", servers {', '.join(self.servers[i])}" if self.servers[i] else ""
        return ray_get(self._ray, ref, allowed if timeout is None else timeout,
                       f"rollout worker {i} (pid {self.pids[i]}{servers})", doing, f"ray.{limit}={allowed:g} s",
                       "a worker that is alive but silent: look at its log above; raise ray.sync_timeout_s / "
                       "ray.call_timeout_s if it is only slow")

    # ------------------------------------------------------------------ weights
    def update_weights(self, model, version: int | None = None) -> None:
        """Send ``model``'s trainable parameters as ``version`` (default: the next); a version already
        sent is not sent again. Loads are queued; the next ``submit`` waits for them."""
        version = self.version + 1 if version is None else version
        if version == self.version:
            return
        if self._sync is not None:  # broadcast now (a collective needs the workers free: see weight_sync.py)
            self.version = version
            self._sync.stage(model, version)
            self._sync.push()
            return
        src = getattr(model, "module", model)
        weights = {n: p.detach().to("cpu", copy=True) for n, p in src.named_parameters() if p.requires_grad}
        self.version, self._weights_ref = version, self._ray.put(weights)
        self._acks = [(i, w, w.load.remote(version, self._weights_ref), version) for i, w in enumerate(self.workers)]

    def _wait_loads(self, acks: list) -> None:
        ray, deadline = self._ray, time.monotonic() + self.cfg.sync_timeout_s
        for i, actor, ref, version in acks:
            doing = f"loading weights version {version}"
            try:
                self._get(ref, "sync_timeout_s", i, doing, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:
                self._replace(i, actor, doing)  # the new worker loads the current version itself

    # ------------------------------------------------------------------ generation
    def submit(self, prompts: list[list[int]], params: SamplingParams, min_version: int | None = None) -> Pending:
        """Send the prompts to the workers, queued behind the weight loads sent since the last request;
        ``collect`` waits for both (one round trip, not two)."""
        check_request(prompts, params)
        loads, self._acks = self._acks, []
        ahead = [r for refs in self._inflight for r in refs]  # queued before this request's loads
        seeds = prompt_seeds(params, len(prompts))
        k = len(self.workers)
        bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
        version = self.version if min_version is None else min_version
        jobs = []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if b > a:
                p = replace(params, seeds=seeds[a:b], seed=None)
                jobs.append(_Job(i, self.workers[i], a, b, p, self.workers[i].generate.remote(prompts[a:b], p, version)))
                self._inflight[i].append(jobs[-1].ref)
        return Pending(prompts, jobs, version, loads, ahead)

    def collect(self, pending: Pending) -> list[Rollout]:
        ray, t0 = self._ray, time.perf_counter()
        if pending.ahead:  # the timeouts below start when the workers reach this request
            ray.wait(pending.ahead, num_returns=len(pending.ahead), timeout=self.cfg.call_timeout_s)
        self._wait_loads(pending.loads)  # a load that never finishes is named as such, within sync_timeout_s
        parts: list[list[Rollout]] = []
        for job in pending.jobs:
            while True:
                doing = (f"generating {job.hi - job.lo} prompts x {job.params.n} samples with weights version "
                         f">= {pending.min_version}")
                try:
                    outs, busy = self._get(job.ref, "call_timeout_s", job.worker, doing)
                    break
                except ray.exceptions.RayActorError:
                    self._replace(job.worker, job.actor, doing)
                    if self._sync is not None:
                        self._sync.push()  # the new worker joins the group and gets the current weights
                    job.actor = self.workers[job.worker]
                    old, job.ref = job.ref, job.actor.generate.remote(pending.prompts[job.lo:job.hi], job.params,
                                                                      pending.min_version)
                    self._inflight[job.worker] = [job.ref if r is old else r for r in self._inflight[job.worker]]
            self._inflight[job.worker] = [r for r in self._inflight[job.worker] if r is not job.ref]
            self._busy[job.worker] += busy
            self._tokens[job.worker] += sum(len(o.completion_ids) for o in outs)
            parts.append(outs)
        out = [r for part in parts for r in part]
        dt = time.perf_counter() - t0
        new = sum(len(r.completion_ids) for r in out)
        self.last_stats = {"gen_s": dt, "new_tokens": float(new), "tokens_per_s": new / max(dt, 1e-9)}
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        if not prompts:
            return []
        return self.collect(self.submit(prompts, params))

    # ------------------------------------------------------------------ the end
    def worker_table(self) -> list[dict]:
        """Per worker: tokens generated, tokens/s while generating, idle share of the run so far, the Ray node
        it runs on (and the servers it fronts, with rollout.engine=server)."""
        wall = max(time.perf_counter() - self._t0, 1e-9)
        return [{"worker": i, "pid": self.pids[i], "tokens": self._tokens[i],
                 "tokens_per_s": self._tokens[i] / max(self._busy[i], 1e-9),
                 "idle_share": max(0.0, 1.0 - self._busy[i] / wall), "node": self.nodes[i],
                 **({"servers": s} if s else {})}
                for i, s in enumerate(self.servers)]

    def close(self) -> None:
        """Stop the workers, and the local cluster when this engine started it."""
        ray = self._ray
        if self._own_weights:  # a server engine deletes its weight files (ray.kill skips exit handlers)
            refs = [w.close.remote() for w in self.workers if w is not None]
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=5)
        for w in self.workers:
            if w is not None:
                try:
                    ray.kill(w)
                except Exception:  # already gone
                    pass
        self.workers = [None] * len(self.workers)
        if self._sync is not None:
            self._sync.close()
        self._model_ref = self._weights_ref = None  # atexit keeps this engine; not the object-store copies
        self._acks, self._inflight = [], [[] for _ in self._inflight]
        _LIVE.discard(self)
        if self._started and ray.is_initialized():
            ray.shutdown()
