"""``ray.weight_sync=collective``: the learner's weights reach the Ray rollout workers by a broadcast over
a torch.distributed process group of the sender (rank 0) and every worker (ranks 1..N).

The group is built from torch's own c10d pieces, never the default group (a learner group may own it):
the sender hosts a ``TCPStore`` on the address Ray reports for its node, and each *generation* of the
group is a ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (weights and workers on GPUs) constructed
directly on a ``PrefixStore`` of its own. A replaced worker makes the next use form a new generation
with every current worker, which then receives the current weights.

Per version the trainable parameters (with LoRA the adapters only) are flattened into one buffer per
dtype and broadcast; each worker copies its slices into its parameters. The version travels by a small
Ray call per worker (``receive``), so generation requests still queue behind it. Every collective waits
at most ``ray.sync_timeout_s`` (the c10d timeout too); a worker that does not join or receive in that
time stops the run with an error naming it, its process and the version. A collective needs every
worker free, so a broadcast first waits for the generations already queued (``ray.call_timeout_s``).
A worker that dies, whatever it was doing, is replaced (``ray.max_restarts``) and the group formed again.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from posttrain.errors import ServiceError


def make_group(backend: str, store, rank: int, size: int, timeout: timedelta):
    """A process group constructed directly (it blocks until every rank has joined, or ``timeout``)."""
    if backend == "nccl":  # written for GPUs, not run here (no GPU machine was lent)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def broadcast(pg, buf: torch.Tensor, timeout: timedelta):
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.timeout = 0, timeout
    return pg.broadcast([buf], opts)


def _prefix(gen: int) -> str:
    return f"posttrain/weights/{gen}"


class GroupReceiver:
    """The rollout worker's end (a base of ``RolloutWorker``); it sets ``self.params`` and ``self.version``."""

    _store = _pg = None
    _gen = 0

    def join(self, host: str, port: int, gen: int, rank: int, size: int, timeout_s: float, backend: str) -> int:
        timeout = timedelta(seconds=timeout_s)
        if self._store is None:
            self._store = dist.TCPStore(host, port, None, False, timeout, wait_for_workers=False)
        if backend == "nccl":
            torch.cuda.set_device(next(iter(self.params.values())).device)
        self._pg = None  # an older generation (it may hold a dead peer) is left for the new one
        store = dist.PrefixStore(_prefix(gen), self._store)
        store.set(f"arrived/{rank}", "1")
        if store.get("verdict") != b"go":  # a peer died before it arrived: this generation is abandoned
            return -1
        self._pg = make_group(backend, store, rank, size, timeout)
        self._gen, self._timeout, self._backend = gen, timeout, backend
        return gen

    def receive(self, version: int, gen: int, layout: list) -> int:
        if gen != self._gen:  # the sender and this worker disagree on the group: never receive blindly
            raise ServiceError(f"rollout worker {self.index} is in weight-sync group generation {self._gen}, "
                               f"asked to receive version {version} in generation {gen}")
        device = next(iter(self.params.values())).device if self._backend == "nccl" else "cpu"
        with torch.no_grad():
            for dtype, items in layout:
                buf = torch.empty(sum(n for _, n in items), dtype=getattr(torch, dtype), device=device)
                broadcast(self._pg, buf, self._timeout).wait()
                at = 0
                for name, n in items:
                    p = self.params[name]
                    p.copy_(buf[at:at + n].view_as(p))
                    at += n
        self.version = version
        return version


class _Died(Exception):
    def __init__(self, i: int, actor, doing: str):
        self.i, self.actor, self.doing = i, actor, doing


class CollectiveSync:
    """The sender's end, held by a ``RayRolloutEngine`` (``engine``): hosts the store, forms the group's
    generations and broadcasts; worker deaths go to the engine's ``_replace``."""

    def __init__(self, engine, backend: str):
        ray = engine._ray
        self.engine, self.ray, self.backend = engine, ray, backend
        self.timeout = timedelta(seconds=engine.cfg.sync_timeout_s)
        self.host = ray.util.get_node_ip_address()  # an address every worker can reach (loopback in the tests)
        self.store = dist.TCPStore(self.host, 0, None, True, self.timeout, wait_for_workers=False)
        self.gen, self.pg, self.stale = 0, None, True  # formed at the first use
        self.layout, self.bufs, self.sent, self.version = [], [], -1, -1

    def stage(self, model, version: int) -> None:
        """Flatten ``model``'s trainable parameters, one buffer per dtype, as ``version``."""
        device = "cuda" if self.backend == "nccl" else "cpu"
        groups: dict[torch.dtype, list] = {}
        for name, p in getattr(model, "module", model).named_parameters():
            if p.requires_grad:
                groups.setdefault(p.dtype, []).append((name, p))
        with torch.no_grad():
            self.bufs = [torch.cat([p.detach().reshape(-1).to(device) for _, p in items]) for items in groups.values()]
        self.layout = [(str(d).removeprefix("torch."), [(n, p.numel()) for n, p in items])
                       for d, items in groups.items()]
        self.version = version

    def push(self) -> None:
        """Bring every worker to the staged version (forming the group again first when a worker was
        replaced); a worker that dies meanwhile is replaced (at most ``ray.max_restarts``) and it starts over."""
        while self.stale or (self.bufs and self.sent != self.version):
            self._drain()
            workers = list(self.engine.workers)
            try:
                if self.stale:
                    self._form(workers)
                if self.bufs:
                    self._send(workers)
            except _Died as d:
                self.stale = True
                self.engine._replace(d.i, d.actor, d.doing)

    def _drain(self) -> None:
        refs = [r for refs in self.engine._inflight for r in refs]
        if refs:  # a dead worker's requests are ready (with its error); collect replaces it
            self.ray.wait(refs, num_returns=len(refs), timeout=self.engine.cfg.call_timeout_s)

    def _form(self, workers: list) -> None:
        """A new generation of the group, in two steps: every worker arrives (the sender's store has its key),
        then the sender says "go" and all construct the group. A worker that dies or fails before that says
        "abandon" instead, so the others return at once rather than wait for its rank until the timeout."""
        self._abort()
        self.gen += 1
        gen, size, s = self.gen, len(workers) + 1, self.engine.cfg.sync_timeout_s
        doing = f"joining weight-sync group generation {gen}"
        store = dist.PrefixStore(_prefix(gen), self.store)
        refs = [w.join.remote(self.host, self.store.port, gen, i + 1, size, s, self.backend)
                for i, w in enumerate(workers)]
        deadline = time.monotonic() + s
        while not store.check([f"arrived/{r}" for r in range(1, size)]):
            failed, _ = self.ray.wait(refs, num_returns=1, timeout=0.05)  # a join that returns now failed
            if failed or time.monotonic() > deadline:
                store.set("verdict", "abandon")
                if failed:
                    self._acks(refs, workers, doing)  # raises: _Died, or the worker's error
                for i, ref in enumerate(refs):  # the first worker that never arrived, named
                    if not store.check([f"arrived/{i + 1}"]):
                        self.engine._get(ref, "sync_timeout_s", i, doing, timeout=0)
                raise ServiceError(f"the weight-sync group (generation {gen}) was not formed within "
                                   f"ray.sync_timeout_s={s:g} s", where="ray.weight_sync",
                                   fix="look at the rollout workers' logs above")
        store.set("verdict", "go")
        try:
            pg = make_group(self.backend, store, 0, size, self.timeout)
        except RuntimeError as err:  # a worker died since it arrived: its ack names it
            self._acks(refs, workers, doing)
            raise ServiceError(f"the weight-sync group (generation {gen}) was not formed within "
                               f"ray.sync_timeout_s={s:g} s: {err}", where="ray.weight_sync",
                               fix="look at the rollout workers' logs above") from None
        self._acks(refs, workers, doing)
        self.pg, self.stale = pg, False

    def _send(self, workers: list) -> None:
        v, gen = self.version, self.gen
        refs = [w.receive.remote(v, gen, self.layout) for w in workers]
        works = [broadcast(self.pg, b, self.timeout) for b in self.bufs]
        self._acks(refs, workers, f"receiving weights version {v} over the weight-sync group")
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:
            raise ServiceError(f"broadcasting weights version {v} to the rollout workers failed: {e}",
                               where="ray.weight_sync") from None
        if self.backend == "nccl":
            torch.cuda.current_stream().synchronize()  # the buffers may be replaced by the next stage
        self.sent = v

    def _acks(self, refs: list, workers: list, doing: str) -> None:
        """Every worker's answer within ``ray.sync_timeout_s``. A dead worker raises ``_Died`` (the group is
        aborted at once, so the others' collectives end too); a silent one the engine's named timeout error;
        else a worker's own error."""
        ray, e = self.ray, self.engine
        deadline = time.monotonic() + e.cfg.sync_timeout_s
        pending, done, dead = dict(zip(refs, range(len(refs)))), [], None
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            i = pending.pop(ready[0])
            try:
                ray.get(ready[0], timeout=0)
            except ray.exceptions.RayActorError:
                if dead is None:
                    dead = i
                    self._abort()
                continue
            except Exception:  # noqa: BLE001 - the worker's own error, raised below unless one died
                done.append((i, ready[0]))
                self._abort()  # the group is broken: the others' collectives end now, not at the timeout
        if dead is not None:
            raise _Died(dead, workers[dead], doing)
        for ref, i in [*pending.items(), *((r, i) for i, r in done)][:1]:  # silent first, then a worker's error
            e._get(ref, "sync_timeout_s", i, doing, timeout=0)

    def _abort(self) -> None:
        if self.pg is not None:
            try:
                self.pg.abort()  # sockets close: a peer waiting in a collective of this generation fails now
            except Exception:  # noqa: BLE001 - already broken
                pass
        self.pg, self.sent = None, -1

    def close(self) -> None:
        self._abort()
        self.store = None
