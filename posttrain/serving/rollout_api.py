"""What a trainer's ``rollout.engine=server`` needs from ``posttrain serve``, with the field names vLLM's
OpenAI server uses for the same things, so one client (:mod:`posttrain.engines.server_engine`) talks to
both.

**Token path of** ``POST /v1/completions``: taken when ``prompt`` is token ids (one list or a list of
lists) or ``return_token_ids`` is true. Sampling is the project's rollout engine
(:class:`~posttrain.engines.rollout.HFRolloutEngine`), so a server and the local engine sample the same
way from the same weights (greedy: the same tokens). vLLM's extra fields work as in vLLM: ``top_k``
(-1/0 = off), ``stop_token_ids`` (further tokens that end a completion), ``ignore_eos``,
``include_stop_str_in_output``, ``skip_special_tokens`` (text only), ``return_tokens_as_token_ids``
(log-prob tokens as ``token_id:<id>``), ``return_token_ids`` (per choice ``token_ids``, the completion
as sampled: a stop token that ended it is included, and ``prompt_token_ids``). ``stop_reason`` is null
for EOS, the token id for a ``stop_token_ids`` hit, the string for a stop string. ``logprobs`` (k ≥ 0)
gives one log-prob per returned token and the k best alternatives, under ``ServeConfig.logprobs_mode``
(vLLM's ``--logprobs-mode``): ``raw_logprobs`` is the model's ``log_softmax(logits)`` (a teacher-forced
pass, as on the text path); ``processed_logprobs`` is the distribution the token was drawn from
(``Rollout.logprobs``: after temperature, top-k, top-p; greedy = untempered), the engine's own numbers.
``posttrain_weights_version`` (a posttrain extension; vLLM ignores unknown fields) makes the server
refuse with HTTP 409 unless it holds that weight version, so a restarted server is never sampled as if
it had the trainer's weights. ``posttrain_seeds`` (also an extension) gives each prompt its own sampling
seed, as the local engine's ``SamplingParams.seeds``: a prompt's samples then follow its own seed, not
its place in the request (batched with other prompts, float rounding of another batch shape can still
flip a sampled token).

**Weights**: ``POST /posttrain/weights {"path", "version"}`` loads a safetensors file of the full
model (``safetensors.torch.save_model`` of a model of the same architecture) into the served model under
the request lock, so no request sees half-loaded weights, and records ``version``; ``GET
/posttrain/weights`` answers ``{version, logprobs_mode, model}``. The path must be readable by the
server: the trainer and the server share a host or a filesystem. A file that does not fit is HTTP 400
and leaves the server at version -1 (the load may have been partial), which refuses version-checked
requests until a load succeeds.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.engines.rollout import SamplingParams
from posttrain.serving.generation import _pad_id, teacher_forced_logprobs
from posttrain.serving.protocol import APIError, CompletionRequest, WeightsRequest


def _stops(req) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def _prompts(server, req: CompletionRequest) -> list[list[int]]:
    prompts = req.token_prompts()
    if prompts is None:
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        prompts = [server.tokenizer(t)["input_ids"] for t in texts]
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt must not be empty", "prompt")
    vocab = server.model.get_input_embeddings().num_embeddings
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise APIError(400, f"prompt token ids must be in 0..{vocab - 1}", "prompt")
    return prompts


def token_completion(server, req: CompletionRequest, max_tokens: int) -> dict:
    """The token path of /v1/completions (see the module docstring); ``server.check`` has run."""
    if req.top_k is not None and req.top_k < -1:
        raise APIError(400, f"top_k must be -1, 0 (off) or positive, got {req.top_k}", "top_k")
    prompts = _prompts(server, req)
    server.check_context(prompts, max_tokens)
    explicit = list(req.stop_token_ids or [])
    eos = [] if req.ignore_eos else list(server.stop_ids)
    seeds = req.posttrain_seeds
    if seeds is not None and (len(seeds) != len(prompts) or any(x < 0 for x in seeds)):
        raise APIError(400, f"posttrain_seeds must hold one non-negative seed per prompt: {len(seeds)} seeds for "
                            f"{len(prompts)} prompts", "posttrain_seeds")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=max(0, req.top_k or 0), stop_token_ids=sorted(set(eos + explicit)),
                            stop_strings=_stops(req), seed=req.seed, n=req.n, seeds=seeds)
    processed = server.cfg.logprobs_mode == "processed_logprobs"
    k = req.logprobs or 0
    with server.lock:
        expected = req.posttrain_weights_version
        if expected is not None and expected != server.weights_version:
            raise APIError(409, f"this server holds weights version {server.weights_version}, the request "
                                f"expects {expected} (0 = as loaded at start: the server restarted; -1 = a "
                                "failed load)", "posttrain_weights_version", "weights_version_mismatch")
        rollouts = server.engine.generate(prompts, params)
        scored = None
        if req.logprobs is not None and (k or not processed):
            scored = teacher_forced_logprobs(server.model, _pad_id(server.tokenizer),
                                             [(r.prompt_ids, r.completion_ids) for r in rollouts], k,
                                             params if processed else None)
    choices = [_choice(server, req, i, r, scored[i] if scored else None, processed, k, explicit)
               for i, r in enumerate(rollouts)]
    return server.response("text_completion", "cmpl", choices, prompts,
                           sum(len(r.completion_ids) for r in rollouts))


def _choice(server, req: CompletionRequest, i: int, r, scored, processed: bool, k: int, explicit) -> dict:
    tok, ids, stops = server.tokenizer, r.completion_ids, _stops(req)
    text = tok.decode(ids, skip_special_tokens=req.skip_special_tokens)
    hits = sorted((text.find(s), s) for s in stops if s in text)
    if hits and not req.include_stop_str_in_output:
        text = text[:hits[0][0]]
    stop_reason = None
    if r.finish_reason == "stop_string":
        stop_reason = hits[0][1] if hits else stops[0]
    elif r.finish_reason == "stop" and ids[-1] in explicit and (req.ignore_eos or ids[-1] not in server.stop_ids):
        stop_reason = ids[-1]
    choice = {"index": i, "text": text, "logprobs": None,
              "finish_reason": "length" if r.finish_reason == "length" else "stop", "stop_reason": stop_reason}
    if req.logprobs is not None:
        def name(t: int) -> str:
            return f"token_id:{t}" if req.return_tokens_as_token_ids else tok.decode([t])

        tokens = [name(t) for t in ids]
        choice["logprobs"] = {
            "tokens": tokens, "token_logprobs": list(r.logprobs) if processed else scored[0],
            "top_logprobs": [{name(a): lp for a, lp in alts} for alts in scored[1]] if k else None,
            "text_offset": [sum(len(s) for s in tokens[:j]) for j in range(len(tokens))]}
    if req.return_token_ids:
        choice["token_ids"], choice["prompt_token_ids"] = list(ids), list(r.prompt_ids)
    return choice


def weights_info(server) -> dict:
    return {"version": server.weights_version, "logprobs_mode": server.cfg.logprobs_mode, "model": server.name}


def load_weights(server, req: WeightsRequest) -> dict:
    """Load ``req.path`` into the served model under the request lock (see the module docstring)."""
    from safetensors.torch import load_model

    path = Path(req.path)
    if not path.is_file():
        raise APIError(400, f"no file {path} on this server; the trainer writes the weights where the server "
                            "can read them (same host, or rollout.server_weights_dir on a shared filesystem)",
                       "path")
    with server.lock:
        try:
            load_model(server.model, str(path), strict=True)
        except Exception as e:  # safetensors raises its own error types; name the file and the cause
            server.weights_version = -1
            raise APIError(400, f"cannot load {path} into the served model ({type(e).__name__}: {e}); the "
                                "server refuses version-checked requests until a load succeeds", "path") from None
        server.engine.update_weights(server.model)  # the fast decode path re-reads its weight copies
        server.weights_version = req.version
    return weights_info(server)


def add_routes(app, server) -> None:
    @app.get("/posttrain/weights")
    def get_weights() -> dict:
        return weights_info(server)

    @app.post("/posttrain/weights")
    def post_weights(req: WeightsRequest) -> dict:
        return load_weights(server, req)
