"""Rollouts from OpenAI-compatible completion servers (``rollout.engine=server``): the interface of
:class:`~posttrain.engines.rollout.HFRolloutEngine`, with generation on one or more ``posttrain serve``
or ``vllm serve`` processes.

``generate`` splits the prompts into contiguous blocks, one per server, and POSTs each block in
parallel to ``<base>/completions`` as token ids (``prompt: [[ids], ...]``) with ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``n``, the seeds (``posttrain serve``: ``posttrain_seeds``, one per
prompt, as the local engine draws them; vLLM: ``seed``, server i ``seed + 1000003 i``), the stop
tokens (``stop_token_ids`` + ``ignore_eos``, so exactly the requested tokens end a completion, as in the
local engine), ``stop`` strings, ``logprobs: 0``, ``return_token_ids`` and
``return_tokens_as_token_ids``. Each choice gives the completion's token ids (``token_ids``; or parsed
from the ``token_id:<id>`` log-prob tokens of a server without ``return_token_ids``) and one log-prob per
token. Choices come back prompt-major, n per prompt, as the local engine returns them.

``update_weights(model)`` writes the model's weights to one safetensors file
(``safetensors.torch.save_model``) in ``weights_dir`` and has every server load it, then checks that all
of them report the new version: ``posttrain serve`` through ``POST /posttrain/weights``, vLLM through
its dev-mode ``POST /collective_rpc`` calling the worker extension
:class:`posttrain.serving.vllm_worker.WeightReload`, then ``POST /reset_prefix_cache``. A server with no
reload endpoint is refused at start-up: the run never samples stale weights. Requests to ``posttrain
serve`` carry the version, so a server that restarted (back to its start-up weights) answers 409 and
the run stops instead of sampling the wrong policy. ``generate`` first re-syncs if the trainer's
weights changed since the last sync (sampled parameter values compared exactly), so evaluations between
optimizer steps see the current weights too.

With ``launcher=ray`` each Ray rollout worker holds one of these engines for its own share of the servers
(worker i of N: servers i, i+N, ...), loaded from the worker's copy of the policy on every weight version
(:mod:`posttrain.engines.ray_engine`); its errors then name the worker too.

Every request has bounded timeouts (connect ``connect_timeout_s``, answer ``timeout_s``); a failed
connection or a 5xx/429 answer is retried ``retries`` times with the same (idempotent) request, a
timeout is not (the same request would wait again). Then a :class:`~posttrain.errors.ServiceError`
names the server and what to check. So a dead server ends the run within seconds and a hung one within
``timeout_s`` plus the retries' connection attempts.

``score(prompts, completions)`` (``prompt_logprobs``) gives log p(c_t | prompt, c_<t) of every given token under
the servers' own model, e.g. a distillation teacher's: each server gets a contiguous block of the sequences,
``batch_size`` of them (prompt + completion as token ids) per ``POST /completions`` with vLLM's ``prompt_logprobs:
0`` and ``max_tokens`` 0 (``posttrain serve``) or 1 (vLLM, which needs at least one token to generate); the log-prob
of each completion token is its own entry in ``prompt_logprobs``. These are the model's raw ``log_softmax(logits)``
(vLLM's prompt log-probs, whatever its ``--logprobs-mode``). Opened with ``sync_weights=False`` the engine only reads
from its servers (a teacher): no reload endpoint is needed and ``update_weights`` is refused.

Log-probs are what the server reports: ``posttrain serve`` started with
``logprobs_mode=processed_logprobs`` and vLLM with ``--logprobs-mode processed_logprobs`` report the
sampling distribution (``Rollout.logprobs``' semantics); the raw default equals it at temperature 1
without top-k/top-p (and for greedy decoding), and a ``posttrain serve`` in raw mode is refused for
other sampling settings. The trainer recomputes its own log-probs and logs the gap either way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import torch

from posttrain.engines.rollout import Rollout, SamplingParams, check_request, prompt_seeds
from posttrain.errors import ConfigError, ServiceError

VLLM_LOAD, VLLM_VERSION = "posttrain_load_weights", "posttrain_weights_version"  # serving/vllm_worker.py
_SAMPLES = 256  # parameter values per tensor compared to detect a weight change


@dataclass
class _Server:
    url: str  # base URL ending in /v1
    root: str  # the same without /v1: /health, /posttrain/weights, /collective_rpc
    kind: str  # "posttrain" or "vllm"
    model: str  # the served model's name (GET /v1/models)
    logprobs_mode: str | None  # posttrain serve's; unknown for vLLM


def _fingerprint(model) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        out.append(flat[::max(1, flat.numel() // _SAMPLES)][:_SAMPLES].to("cpu", copy=True))
    return out


def _remove_own_files(directory: Path, pid: int) -> None:
    for f in directory.glob(f"weights-{pid}-*.safetensors*"):
        f.unlink(missing_ok=True)


def _same(a: list[torch.Tensor] | None, b: list[torch.Tensor]) -> bool:
    return a is not None and len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class ServerRolloutEngine:
    """``ServerRolloutEngine(servers, model)``: ``servers`` are base URLs (``http://host:port/v1``);
    ``model`` (optional) is synced to them at once. See the module docstring."""

    def __init__(self, servers: list[str], model=None, *, timeout_s: float = 300.0, connect_timeout_s: float = 10.0,
                 retries: int = 2, weights_dir: str | None = None, backoff_s: float = 0.5, transport=None,
                 sync_weights: bool = True):
        if not servers:
            raise ConfigError("the server rollout engine needs at least one server URL", where="rollout.servers",
                              fix="rollout.servers=[http://127.0.0.1:8001/v1]")
        if sync_weights and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_rank() != 0:  # each process would reload the servers' weights on its own
            raise ConfigError("with several trainer processes only the main one drives the servers (the others "
                              "reach them through it: online.rollout_engine)", where="rollout.engine",
                              fix="report this: a code path builds the server engine on every process")
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                                    transport=transport)
        self.sync_weights = sync_weights
        self.servers = [self._probe(u) for u in servers]
        self._pool = ThreadPoolExecutor(max_workers=len(self.servers), thread_name_prefix="rollout-server")
        if not sync_weights:  # read-only (a teacher): no weight files
            self.weights_dir, self._cleanup = None, lambda: None
        elif weights_dir is None:
            self.weights_dir = Path(tempfile.mkdtemp(prefix="posttrain-weights-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.weights_dir), True)
        else:  # a directory of the user's: remove only this process's files at exit
            self.weights_dir = Path(weights_dir)
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            self._cleanup = weakref.finalize(self, _remove_own_files, self.weights_dir, os.getpid())
        self.version, self._file, self._model, self._synced = 0, None, None, None
        self.last_stats: dict[str, float] = {}
        if model is not None:
            self.update_weights(model)

    # ------------------------------------------------------------------ HTTP
    def _call(self, method: str, url: str, what: str, retry_5xx: bool = True, **kw) -> httpx.Response:
        """One request, retried on connection failures and 5xx/429 answers; 2xx-4xx answers (and 5xx ones
        with ``retry_5xx=False``) are returned."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = self._client.request(method, url, **kw)
            except httpx.ConnectTimeout:
                last = f"no connection within {self.connect_timeout_s:g} s"
                continue
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout_s:g} s (rollout.server_timeout_s)"
                break
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e or 'connection failed'}"
                continue
            if (r.status_code < 500 or not retry_5xx) and r.status_code != 429:
                return r
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        raise ServiceError(f"{what} failed after {attempt + 1} tries ({last})", where=url,
                           fix="check that this server is running and reachable (GET /health) and read its log; "
                               "a server that died must be restarted (then restart the run, or resume it)")

    def _json(self, r: httpx.Response, what: str) -> dict:
        if r.status_code != 200:
            try:
                msg = r.json().get("error", {}).get("message") or r.text
            except ValueError:
                msg = r.text
            raise ServiceError(f"{what}: {r.request.url} answered HTTP {r.status_code}: {str(msg)[:500]}",
                               where=str(r.request.url))
        try:
            return r.json() if r.content else {}
        except ValueError:
            raise ServiceError(f"{what}: {r.request.url} answered something that is not JSON: {r.text[:200]!r}",
                               where=str(r.request.url)) from None

    def _probe(self, url: str) -> _Server:
        """Which kind of server ``url`` is, its model name, and whether it can reload weights."""
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"server URL {url!r} must start with http:// or https://", where="rollout.servers")
        url = url.rstrip("/")
        url = url if url.endswith("/v1") else url + "/v1"
        root = url[:-3]
        models = self._json(self._call("GET", url + "/models", "listing the served model"), "GET /v1/models")
        try:
            name = models["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise ServiceError(f"{url}/models lists no model; is this an OpenAI-compatible server?",
                               where=url) from None
        r = self._call("GET", root + "/posttrain/weights", "asking for the weight version")
        if r.status_code == 200:
            return _Server(url, root, "posttrain", name, self._json(r, "GET /posttrain/weights").get("logprobs_mode"))
        if not self.sync_weights:  # read-only: any OpenAI-compatible server with vLLM's extensions
            return _Server(url, root, "vllm", name, None)
        r = self._call("POST", root + "/collective_rpc", "asking for the weight version", retry_5xx=False,
                       json={"method": VLLM_VERSION, "timeout": self.timeout_s})  # 5xx: no such worker method
        if r.status_code == 200:
            return _Server(url, root, "vllm", name, None)
        if r.status_code == 404:
            raise ServiceError(f"{root} has no weight-reload endpoint (neither posttrain serve's /posttrain/weights "
                               "nor vLLM's /collective_rpc), so it would keep sampling its start-up weights",
                               where=url, fix="serve with `posttrain serve`, or start vllm serve with "
                               "VLLM_SERVER_DEV_MODE=1 as docs/rollout.md shows")
        raise ServiceError(f"{root}/collective_rpc cannot run {VLLM_VERSION} (HTTP {r.status_code}: {r.text[:200]})",
                           where=url, fix="start vllm serve with --worker-extension-cls "
                           "posttrain.serving.vllm_worker.WeightReload (posttrain installed in vLLM's environment)")

    def _parallel(self, fn, jobs: list) -> list:
        futures = [self._pool.submit(fn, *job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:  # the first failure, in server order among those that finished
            if f in done and f.exception() is not None:
                raise f.exception()
        return [f.result() for f in futures]

    # ------------------------------------------------------------------ weights
    def update_weights(self, model, version: int | None = None) -> None:
        """Write ``model``'s weights to a file and have every server load it (see the module docstring;
        the engine numbers its own versions)."""
        from safetensors.torch import save_file, save_model

        from posttrain.models.loading import is_peft, merged_weights

        if not self.sync_weights:
            raise ConfigError("this server engine was opened read-only (sync_weights=False, e.g. a teacher): it does "
                              "not send weights to its servers", where="rollout.servers")
        src = getattr(model, "module", model)  # DDP / accelerate wrappers
        t0, version = time.perf_counter(), self.version + 1
        path = self.weights_dir / f"weights-{os.getpid()}-{version}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        if is_peft(src):  # LoRA: the servers hold whole weights, so they get the adapters merged into them
            save_file({k: v.contiguous() for k, v in merged_weights(src).items()}, str(tmp))
        else:
            save_model(src, str(tmp))
        os.replace(tmp, path)  # a server never reads a half-written file
        try:
            self._parallel(self._push, [(s, path, version) for s in self.servers])
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if self._file is not None:
            self._file.unlink(missing_ok=True)
        self.version, self._file, self._model, self._synced = version, path, src, _fingerprint(src)
        self.last_stats["sync_s"] = time.perf_counter() - t0

    def _push(self, s: _Server, path: Path, version: int) -> None:
        if s.kind == "posttrain":
            got = self._json(self._call("POST", s.root + "/posttrain/weights", "loading weights",
                                        json={"path": str(path), "version": version}), "POST /posttrain/weights")
            versions = [got.get("version")]
        else:
            got = self._json(self._call("POST", s.root + "/collective_rpc", "loading weights",
                                        json={"method": VLLM_LOAD, "args": [str(path), str(version)],
                                              "timeout": self.timeout_s}), "POST /collective_rpc")
            versions = got.get("results") or [None]
            self._json(self._call("POST", s.root + "/reset_prefix_cache", "resetting the prefix cache"),
                       "POST /reset_prefix_cache")
        if any(str(v) != str(version) for v in versions):
            raise ServiceError(f"{s.root} reports weight version(s) {versions} after loading version {version}",
                               where=s.url, fix="check the server's log; every server must load every update")

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        if not check_request(prompts, params):
            return []
        plain = params.temperature in (0, 1) and params.top_p == 1 and params.top_k == 0
        for s in self.servers:
            if s.logprobs_mode == "raw_logprobs" and not plain:
                raise ConfigError(f"{s.url} reports raw log-probs, which are not the sampling distribution at "
                                  f"temperature {params.temperature}, top_p {params.top_p}, top_k {params.top_k}",
                                  where="rollout.servers",
                                  fix="start posttrain serve with logprobs_mode=processed_logprobs")
        if self._model is not None and not _same(self._synced, _fingerprint(self._model)):
            self.update_weights(self._model)  # the trainer stepped since the last sync
        # posttrain serve takes one seed per prompt (posttrain_seeds, as the local engine); vLLM one per request
        seeds = prompt_seeds(params, len(prompts))
        seed = params.seed if params.seed is not None else seeds[0] % 2**31
        k = len(self.servers)
        bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
        jobs = [(s, prompts[a:b], replace(params, seeds=seeds[a:b]), (seed + 1_000_003 * i) % 2**31)
                for i, (s, a, b) in enumerate(zip(self.servers, bounds[:-1], bounds[1:])) if b > a]
        t0 = time.perf_counter()
        rollouts = [r for part in self._parallel(self._generate_on, jobs) for r in part]
        dt = time.perf_counter() - t0
        new = sum(len(r.completion_ids) for r in rollouts)
        self.last_stats.update(gen_s=dt, new_tokens=float(new), tokens_per_s=new / max(dt, 1e-9))
        return rollouts

    def _generate_on(self, s: _Server, prompts: list[list[int]], params: SamplingParams, seed: int) -> list[Rollout]:
        body = {"model": s.model, "prompt": [list(p) for p in prompts], "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "n": params.n, "seed": seed,
                "logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True}
        if params.top_k:
            body["top_k"] = params.top_k
        if params.stop_token_ids is not None:  # exactly these end a completion ([] = none), as locally
            body.update(stop_token_ids=list(params.stop_token_ids), ignore_eos=True)
        if params.stop_strings:
            body.update(stop=list(params.stop_strings), include_stop_str_in_output=True)
        if s.kind == "posttrain":
            body.update(posttrain_weights_version=self.version, posttrain_seeds=list(params.seeds))
        data = self._json(self._call("POST", s.url + "/completions", "generation", json=body), "POST /v1/completions")
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts) * params.n:
            raise ServiceError(f"{s.url} returned {len(choices)} completions for {len(prompts)} prompts x "
                               f"n={params.n}", where=s.url)
        return [self._rollout(s, prompts[i // params.n], c) for i, c in enumerate(choices)]

    @staticmethod
    def _rollout(s: _Server, prompt: list[int], c: dict) -> Rollout:
        lp = c.get("logprobs") or {}
        ids, tokens = c.get("token_ids"), lp.get("tokens")
        if ids is None and tokens is not None and all(str(t).startswith("token_id:") for t in tokens):
            ids = [int(str(t)[len("token_id:"):]) for t in tokens]
        if ids is None:
            raise ServiceError(f"{s.url} returned no completion token ids", where=s.url,
                               fix="use posttrain serve, or vLLM >= 0.10.2 (return_token_ids; docs/rollout.md)")
        if c.get("prompt_token_ids") not in (None, list(prompt)):
            raise ServiceError(f"{s.url} did not sample from the prompt token ids it was sent", where=s.url)
        lps = lp.get("token_logprobs")
        if lps is None or len(lps) != len(ids) or any(x is None for x in lps):
            raise ServiceError(f"{s.url} returned {len(ids)} completion tokens but log-probs "
                               f"{'none' if lps is None else len(lps)}", where=s.url)
        reason = ("length" if c.get("finish_reason") == "length" else
                  "stop_string" if isinstance(c.get("stop_reason"), str) else "stop")
        return Rollout(list(prompt), [int(t) for t in ids], [float(x) for x in lps], reason)

    # ------------------------------------------------------------------ scoring
    def prompt_logprobs(self, seqs: list[list[int]], batch_size: int = 16, top_k: int = 0,
                        every_server: bool = False) -> list:
        """vLLM's ``prompt_logprobs`` of each token sequence (per token: None for the first, then
        ``{"<token id>": {"logprob", ...}}`` for the token and the ``top_k`` likeliest), in order; the servers
        share the sequences in contiguous blocks. ``every_server``: each server scores every sequence, and the
        result is one such list per server (a start-up check that they all serve what is expected)."""
        if every_server:
            return self._parallel(self._prompt_logprobs_on, [(s, seqs, batch_size, top_k) for s in self.servers])
        k = len(self.servers)
        bounds = [round(i * len(seqs) / k) for i in range(k + 1)]
        jobs = [(s, seqs[a:b], batch_size, top_k) for s, a, b in zip(self.servers, bounds[:-1], bounds[1:]) if b > a]
        return [x for part in self._parallel(self._prompt_logprobs_on, jobs) for x in part]

    def _prompt_logprobs_on(self, s: _Server, seqs: list[list[int]], batch_size: int, top_k: int) -> list:
        out = []
        for i in range(0, len(seqs), max(1, batch_size)):
            chunk = [list(x) for x in seqs[i:i + max(1, batch_size)]]
            body = {"model": s.model, "prompt": chunk, "prompt_logprobs": top_k, "temperature": 0,
                    "max_tokens": 0 if s.kind == "posttrain" else 1}  # vLLM generates >= 1 token (without echo)
            data = self._json(self._call("POST", s.url + "/completions", "scoring", json=body), "POST /v1/completions")
            choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
            if len(choices) != len(chunk):
                raise ServiceError(f"{s.url} returned {len(choices)} choices for {len(chunk)} prompts", where=s.url)
            for seq, c in zip(chunk, choices):
                lp = c.get("prompt_logprobs")
                if not isinstance(lp, list) or len(lp) != len(seq):
                    raise ServiceError(f"{s.url} returned {'no' if lp is None else len(lp)} prompt_logprobs for a "
                                       f"{len(seq)}-token prompt", where=s.url,
                                       fix="use posttrain serve or vllm serve (vLLM's prompt_logprobs extension)")
                out.append(lp)
        return out

    def score(self, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 16) -> list[list[float]]:
        """log p(c_t | prompt, c_<t) of every token of each completion under the servers' model (the module
        docstring); ``batch_size`` sequences per request."""
        if any(not p for p in prompts):
            raise ConfigError("scoring needs a non-empty prompt before each completion (the first token of a "
                              "sequence has no log-prob)", where="prompts")
        seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
        out = []
        for p, c, lps in zip(prompts, completions, self.prompt_logprobs(seqs, batch_size)):
            row = []
            for j, t in enumerate(c):
                entry = (lps[len(p) + j] or {}).get(str(t))
                if not isinstance(entry, dict) or not isinstance(entry.get("logprob"), (int, float)):
                    raise ServiceError(f"a server's prompt_logprobs have no log-prob for token {t} at position "
                                       f"{len(p) + j}", where=", ".join(s.url for s in self.servers))
                row.append(float(entry["logprob"]))
            out.append(row)
        return out

    def close(self) -> None:
        """Stop the request threads and delete the weight files this engine wrote."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        self._file = None
        self._cleanup()
