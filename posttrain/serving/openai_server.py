"""``posttrain serve``: a local Hugging Face causal LM behind the OpenAI-compatible HTTP protocol.

Endpoints (the subset judges and evaluation need, with OpenAI's request and response shapes):

- ``POST /v1/chat/completions``: ``messages``, ``max_tokens`` (or ``max_completion_tokens``),
  ``temperature`` (0 = greedy), ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs`` + ``top_logprobs`` (≤ 5)
- ``POST /v1/completions``: ``prompt`` (a string or a list of strings), the same sampling fields,
  ``logprobs`` as the legacy integer (top-k alternatives per token, ≤ 5)
- ``GET /v1/models``, ``GET /health``
- for trainers (``rollout.engine=server``), :mod:`posttrain.serving.rollout_api`: the token path of
  ``/v1/completions`` (token-id prompts, ``return_token_ids``, vLLM's extra sampling fields) and
  ``GET``/``POST /posttrain/weights`` (reload the weights from a safetensors file, with a version)
- for a distillation teacher, vLLM's ``prompt_logprobs: k`` (0..5; token-id prompts): per choice a list
  aligned with the prompt, ``null`` first, then ``{"<id>": {"logprob", "rank", "decoded_token"}}`` for
  the token and the k likeliest; the model's raw ``log_softmax(logits)`` whatever ``logprobs_mode``, as
  in vLLM. ``max_tokens: 0`` (an extension: vLLM needs 1) scores without generating (empty choices)

Log-probs are those of the model's own next-token distribution (log-softmax of the raw logits),
not of the temperature/top-p-adjusted sampling distribution, so they are comparable across
requests and finite for every emitted token; the token path can report the sampling distribution's
instead (``logprobs_mode=processed_logprobs``, vLLM's ``--logprobs-mode``). A field we do not
implement (``stream``, non-zero penalties, ``echo``, ...) is answered with HTTP 400 rather than
silently ignored.

Generation goes through the single function ``serving.generation._generate`` (the project's rollout
engine, with log-probs from a teacher-forced pass), so a different decoding backend can be swapped in
without touching the HTTP layer. One model serves one request at a time: requests are serialized through
a lock (the ``n`` samples of one request share a batch; there is no cross-request batching).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from posttrain.config import ModelConfig, opt
from posttrain.data.chat import encode_prompt
from posttrain.errors import ConfigError, ServiceError
from posttrain.models.forward import separable_head
from posttrain.models.loading import eval_mode, load_causal_lm, load_tokenizer
from posttrain.serving import rollout_api
from posttrain.serving.generation import _engine, _generate, _pad_id, cut_at_stop, stop_token_ids
from posttrain.serving.protocol import (MAX_TOP_LOGPROBS, TOKEN_FIELDS, APIError, ChatRequest, CompletionRequest,
                                        _Sampling)


@dataclass
class ServeConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="Model to serve (path, hub id or 'tiny').")
    host: str = opt("127.0.0.1", "Interface to bind; loopback by default (there is no auth).")
    port: int = opt(8000, "TCP port (0 picks a free one).")
    served_model_name: str | None = opt(None, "Name reported by /v1/models and accepted in the "
                                        "'model' field; null = model.name_or_path.")
    max_tokens_cap: int = opt(1024, "Largest max_tokens a request may ask for; larger requests get "
                              "HTTP 400 naming this cap.")
    default_max_tokens: int = opt(256, "max_tokens when a request gives none.")
    max_n: int = opt(16, "Largest n (samples per prompt) a request may ask for.")
    threads: int | None = opt(None, "torch intra-op threads (null = torch default).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = opt(
        "info", "uvicorn log level.")
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = opt(
        "raw_logprobs", "Log-probs on the token-id path of /v1/completions (vLLM's --logprobs-mode): "
        "raw_logprobs = the model's log_softmax(logits); processed_logprobs = the distribution the "
        "token was sampled from (temperature, top-k, top-p), what a trainer's rollout.engine=server "
        "needs when it samples at a temperature other than 1 or with top-k/top-p. The text path "
        "always reports raw log-probs.", "vLLM --logprobs-mode")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}", where="port")
        for key in ("max_tokens_cap", "default_max_tokens", "max_n"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}", where=key)
        if self.default_max_tokens > self.max_tokens_cap:
            raise ConfigError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens_cap="
                              f"{self.max_tokens_cap}", where="default_max_tokens",
                              fix=f"set default_max_tokens <= {self.max_tokens_cap}")


# ----------------------------------------------------------------------------- helpers


class _CompletionRequest(CompletionRequest):  # + vLLM's prompt_logprobs (the module docstring)
    max_tokens: int | None = Field(None, ge=0)  # 0: prompt_logprobs only, nothing generated
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _byte_decoder()


def _stops(req: _Sampling) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def _content_text(content: str | list[dict] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise APIError(400, f"content part of type {part.get('type')!r} is not supported; this "
                                "server takes text only", "messages")
        parts.append(part.get("text", ""))
    return "".join(parts)


# ----------------------------------------------------------------------------- the app


class _Server:
    """The model, its tokenizer and the request handling that does not depend on FastAPI."""

    def __init__(self, model, tokenizer, cfg: ServeConfig, name: str):
        self.model, self.tokenizer, self.cfg, self.name = model, tokenizer, cfg, name
        self.lock = threading.Lock()
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.engine = _engine(model, tokenizer)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.weights_version = 0  # 0 = as loaded at start; POST /posttrain/weights sets the trainer's count

    def check(self, req: _Sampling) -> int:
        """Reject what we do not implement; return the max_tokens to use."""
        if req.model is not None and req.model not in (self.name, self.cfg.model.name_or_path):
            raise APIError(404, f"model '{req.model}' is not served here; this server has "
                                f"'{self.name}'", "model", "model_not_found")
        if req.stream:
            raise APIError(400, "stream=true is not supported by posttrain serve", "stream")
        for key in ("presence_penalty", "frequency_penalty"):
            if getattr(req, key):
                raise APIError(400, f"{key} is not supported (must be 0)", key)
        if req.n > self.cfg.max_n:
            raise APIError(400, f"n={req.n} exceeds this server's max_n={self.cfg.max_n}", "n")
        stops = _stops(req)
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must not be empty", "stop")
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", "stop")
        max_tokens = req.max_completion_tokens or req.max_tokens or self.cfg.default_max_tokens
        if max_tokens > self.cfg.max_tokens_cap:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's cap of "
                                f"{self.cfg.max_tokens_cap} (posttrain serve max_tokens_cap)",
                           "max_tokens")
        return max_tokens

    def check_context(self, prompts: list[list[int]], max_tokens: int) -> None:
        longest = max(len(p) for p in prompts)
        if self.max_positions and longest + max_tokens > self.max_positions:
            raise APIError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {self.max_positions} tokens", "max_tokens")

    def generate(self, prompts: list[list[int]], req: _Sampling, max_tokens: int, logprobs: bool,
                 top_k: int):
        self.check_context(prompts, max_tokens)
        with self.lock:
            return _generate(self.model, self.tokenizer, prompts, max_new_tokens=max_tokens,
                             temperature=req.temperature, top_p=req.top_p, n=req.n, seed=req.seed,
                             logprobs=logprobs, top_logprobs=top_k, stop_token_ids=self.stop_ids,
                             stop_strings=_stops(req), engine=self.engine)

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        """(text, raw bytes) of one token. A byte-level BPE token may hold part of a UTF-8
        character: its text is then U+FFFD, but its bytes come from the byte alphabet exactly."""
        text = self.tokenizer.decode([token_id])
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(c in _BYTE_DECODER for c in piece):
            return text, [_BYTE_DECODER[c] for c in piece]
        return text, list(text.encode("utf-8"))

    def _entry(self, token_id: int, logprob: float) -> dict:
        text, raw = self._token(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    def chat(self, req: ChatRequest) -> dict:
        max_tokens = self.check(req)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        messages = [{"role": m.role, "content": _content_text(m.content)} for m in req.messages]
        ids = encode_prompt(self.tokenizer, messages)
        top_k = (req.top_logprobs or 0) if req.logprobs else 0
        gens = self.generate([ids], req, max_tokens, req.logprobs, top_k)
        stops = _stops(req)
        choices = []
        for i, g in enumerate(gens):
            text, keep, hit = cut_at_stop(self.tokenizer, g.token_ids, stops)
            logprobs = None
            if req.logprobs:
                logprobs = {"content": [
                    {**self._entry(g.token_ids[t], g.logprobs[t]),
                     "top_logprobs": [self._entry(a, lp) for a, lp in g.top_logprobs[t]]}
                    for t in range(keep)]}
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": logprobs, "finish_reason": "stop" if hit else g.finish_reason})
        return self.response("chat.completion", "chatcmpl", choices, [ids], sum(len(g.token_ids) for g in gens))

    def completion(self, req: _CompletionRequest) -> dict:
        if req.max_tokens == 0 and req.prompt_logprobs is None:
            raise APIError(400, "max_tokens=0 (score without generating) needs prompt_logprobs", "max_tokens")
        max_tokens = self.check(req)
        if req.echo:
            raise APIError(400, "echo=true is not supported by posttrain serve", "echo")
        if req.prompt_logprobs is not None:
            return self.scored_completion(req, max_tokens)
        if req.return_token_ids or req.token_prompts() is not None:
            return rollout_api.token_completion(self, req, max_tokens)
        for key in TOKEN_FIELDS:
            if key in req.model_fields_set:
                raise APIError(400, f"{key} needs token-id prompts or return_token_ids=true", key)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt must not be an empty list", "prompt")
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        if any(not x for x in ids):
            raise APIError(400, "prompt must not be empty", "prompt")
        top_k = req.logprobs or 0
        gens = self.generate(ids, req, max_tokens, req.logprobs is not None, top_k)
        stops = _stops(req)
        choices = []
        for i, g in enumerate(gens):
            text, keep, hit = cut_at_stop(self.tokenizer, g.token_ids, stops)
            logprobs = None
            if req.logprobs is not None:
                tokens = [self._token(t)[0] for t in g.token_ids[:keep]]
                offsets = [sum(len(s) for s in tokens[:j]) for j in range(len(tokens))]
                logprobs = {"tokens": tokens, "token_logprobs": g.logprobs[:keep],
                            "top_logprobs": [{self._token(a)[0]: lp for a, lp in g.top_logprobs[t]}
                                             for t in range(keep)] if top_k else None,
                            "text_offset": offsets}
            choices.append({"index": i, "text": text, "logprobs": logprobs,
                            "finish_reason": "stop" if hit else g.finish_reason})
        return self.response("text_completion", "cmpl", choices, ids, sum(len(g.token_ids) for g in gens))

    def scored_completion(self, req: _CompletionRequest, max_tokens: int) -> dict:
        """vLLM's prompt_logprobs on token-id prompts, with or without generation (module docstring)."""
        if req.token_prompts() is None:
            raise APIError(400, "prompt_logprobs needs token-id prompts (prompt: [ids] or [[ids], ...])", "prompt")
        prompts, n = rollout_api._prompts(self, req), req.n
        if req.max_tokens != 0:  # the version check, if asked, runs there
            body = rollout_api.token_completion(self, req, max_tokens)
        elif req.posttrain_weights_version not in (None, self.weights_version):
            raise APIError(409, f"this server holds weights version {self.weights_version}, the request expects "
                                f"{req.posttrain_weights_version}", "posttrain_weights_version",
                           "weights_version_mismatch")
        else:
            self.check_context(prompts, 0)
            body = self.response("text_completion", "cmpl", [
                {"index": i, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                 **({"token_ids": [], "prompt_token_ids": prompts[i // n]} if req.return_token_ids else {})}
                for i in range(len(prompts) * n)], prompts, 0)
        with self.lock:
            scored = self.prompt_logprobs(prompts, req.prompt_logprobs)
        for i, choice in enumerate(body["choices"]):
            choice["prompt_logprobs"] = scored[i // n]
        return body

    def prompt_logprobs(self, prompts: list[list[int]], k: int) -> list[list[dict | None]]:
        """vLLM's prompt_logprobs of each prompt (raw log-probs) from one right-padded forward."""
        dev, width, pad = next(self.model.parameters()).device, max(len(p) for p in prompts), _pad_id(self.tokenizer)
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], device=dev)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=dev)
        base, head = separable_head(self.model)
        out = []
        with eval_mode(self.model), torch.no_grad():
            if head is not None:
                hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            else:
                full = self.model(input_ids=ids, attention_mask=mask).logits
            for i, p in enumerate(prompts):
                rows: list[dict | None] = [None]
                for a in range(0, len(p) - 1, 1024):  # [1024, vocab] log-probs at a time, as vLLM
                    b, targets = min(a + 1024, len(p) - 1), p[a + 1:a + 1025]
                    x = head(hidden[i, a:b]) if head is not None else full[i, a:b]
                    logp = torch.log_softmax(x.float(), dim=-1)
                    chosen = logp.gather(-1, torch.tensor(targets, device=dev)[:, None])
                    ranks, top = ((logp > chosen).sum(-1) + 1).tolist(), logp.topk(k, dim=-1)
                    for j, (t, lp) in enumerate(zip(targets, chosen[:, 0].tolist())):
                        alts = zip(top.indices[j].tolist(), top.values[j].tolist(), range(1, k + 1))
                        rows.append({str(c): {"logprob": max(v, -9999.0), "rank": r, "decoded_token": self._token(c)[0]}
                                     for c, v, r in [(t, lp, ranks[j]), *alts]})  # -inf: -9999.0 as vLLM
                out.append(rows)
        return out

    def response(self, obj: str, prefix: str, choices: list, prompts: list, completion_tokens: int) -> dict:
        # OpenAI counts each prompt once however many samples (n) it gets
        prompt_tokens = sum(len(p) for p in prompts)
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


def create_app(model, tokenizer, cfg: ServeConfig, name: str | None = None):
    """The FastAPI app for an already loaded model and tokenizer."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    server = _Server(model, tokenizer, cfg, name or cfg.served_model_name or cfg.model.name_or_path)
    app = FastAPI(title="posttrain serve", version="1")

    def error(status: int, message: str, param: str | None, kind: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {
            "message": message, "type": kind, "param": param, "code": None}})

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ())[1:])
        return error(400, f"{loc or 'request'}: {first.get('msg', 'invalid request')}", loc or None,
                     "invalid_request_error")

    # sync handlers run in FastAPI's thread pool; the lock inside _Server serializes the model
    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest) -> dict:
        return server.chat(req)

    @app.post("/v1/completions")
    def completions(req: _CompletionRequest) -> dict:
        return server.completion(req)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": server.name, "object": "model",
                                            "created": 0, "owned_by": "posttrain"}]}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": server.name, "weights_version": server.weights_version}

    rollout_api.add_routes(app, server)
    return app


def build_app(cfg: ServeConfig):
    """Load the configured model and tokenizer and build the app."""
    tokenizer = load_tokenizer(cfg.model.name_or_path, revision=cfg.model.revision,
                               trust_remote_code=cfg.model.trust_remote_code)
    model = load_causal_lm(cfg.model)
    return create_app(model, tokenizer, cfg)


def run(cfg: ServeConfig) -> dict:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    app = build_app(cfg)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    except OSError as e:  # port in use, permission denied
        raise ServiceError(f"cannot listen on {cfg.host}:{cfg.port}: {e}", where="port",
                           fix="choose a free port, e.g. port=0 or port=8001") from None
    return {}


def start_server_in_thread(model_path: str, port: int = 0, **options: Any):
    """Serve ``model_path`` from a background thread (tests, notebooks, judge runs).

    Returns ``(base_url, stop)`` where ``base_url`` ends in ``/v1`` (what OpenAI clients expect) and
    ``stop()`` shuts the server down. ``options`` are further :class:`ServeConfig` fields.
    """
    import uvicorn

    cfg = ServeConfig(model=ModelConfig(name_or_path=model_path), port=port, **options)
    cfg.validate()
    app = build_app(cfg)
    # bind first so port=0 yields a known free port with no race between choosing and binding
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, port))
    except OSError as e:
        sock.close()
        raise ServiceError(f"cannot listen on {cfg.host}:{port}: {e}", where="port",
                           fix="choose a free port or 0") from None
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"posttrain-serve-{bound}")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise ServiceError(f"the server on {cfg.host}:{bound} did not start",
                               where=f"http://{cfg.host}:{bound}")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return f"http://{cfg.host}:{bound}/v1", stop
