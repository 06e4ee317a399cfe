"""Where judge and policy text comes from: a local Hugging Face model or an OpenAI-compatible server.

Both implement :class:`ChatBackend` (batched chat completion). Backends that can also score fixed
answers implement ``choice_logprobs`` (see :func:`supports_choice_logprobs`), which calibrated
verdicts use instead of parsing generated text.

A backend is chosen by a spec string:

- ``hf:<model path or hub id>``  (``hf:tiny`` is the offline tiny model)
- ``openai:<base_url>#<model>``  e.g. ``openai:http://127.0.0.1:8000/v1#tiny`` or
  ``openai:https://api.openai.com/v1#gpt-4o-mini`` (the key comes from ``api_key``)
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from posttrain.config import ModelConfig
from posttrain.data.chat import encode_prompt
from posttrain.errors import ConfigError, ServiceError
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.serving.generation import _engine, _generate, stop_token_ids, teacher_forced_logprobs

log = logging.getLogger(__name__)

Messages = list[dict]


@runtime_checkable
class ChatBackend(Protocol):
    """Batched chat completion: one reply per conversation, in order.

    Optional extension: ``choice_logprobs(messages, choices) -> {choice: log p}``, the log-probability
    that the assistant's reply *starts with* each choice string (teacher forcing where possible).
    """

    name: str

    def complete(self, messages_list: list[Messages], max_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]: ...


def supports_choice_logprobs(backend: object) -> bool:
    return callable(getattr(backend, "choice_logprobs", None))


def _logsumexp(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


# ----------------------------------------------------------------------------- local model


class HFBackend:
    """A local causal LM loaded with the project's loaders; greedy when temperature is 0.

    Sampling is reproducible: call i of :meth:`complete` seeds batch j with ``seed + 1000 i + j``.
    A prompt longer than the model's context minus ``max_tokens`` keeps its *last* tokens (the
    responses and the verdict instructions sit at the end of our prompts); each such truncation is
    counted in ``truncated_prompts`` and logged once.
    """

    def __init__(self, model_name_or_path: str, model_cfg: ModelConfig | None = None,
                 batch_size: int = 8, seed: int = 0, model=None, tokenizer=None):
        cfg = model_cfg or ModelConfig(name_or_path=model_name_or_path)
        self.name = f"hf:{model_name_or_path}"
        self.tokenizer = tokenizer or load_tokenizer(model_name_or_path, revision=cfg.revision,
                                                     trust_remote_code=cfg.trust_remote_code)
        self.model = model if model is not None else load_causal_lm(cfg, model_name_or_path)
        self.model.eval()
        self.batch_size, self.seed = batch_size, seed
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._engine = None  # the rollout engine, built on first use
        self.truncated_prompts = 0
        self._calls, self._capped = 0, False

    def _prompt_ids(self, messages: Messages, room: int) -> list[int]:
        ids = encode_prompt(self.tokenizer, messages)
        if self.max_positions and len(ids) > self.max_positions - room:
            if not self.truncated_prompts:
                log.warning("%s: a prompt of %d tokens exceeds the context (%d) minus %d; keeping its "
                            "last tokens", self.name, len(ids), self.max_positions, room)
            self.truncated_prompts += 1
            ids = ids[len(ids) - (self.max_positions - room):]
        return ids

    def complete(self, messages_list: list[Messages], max_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]:
        self._engine = self._engine or _engine(self.model, self.tokenizer)
        if self.max_positions and max_tokens > self.max_positions // 2:  # else no room would be left for the prompt
            if not self._capped:
                log.warning("%s: max_tokens=%d is more than half the context (%d); generating at most %d",
                            self.name, max_tokens, self.max_positions, self.max_positions // 2)
            self._capped, max_tokens = True, self.max_positions // 2
        stops = stop_token_ids(self.model, self.tokenizer)
        call, self._calls = self._calls, self._calls + 1
        texts: list[str] = []
        for j, start in enumerate(range(0, len(messages_list), self.batch_size)):
            chunk = messages_list[start:start + self.batch_size]
            ids = [self._prompt_ids(m, max_tokens) for m in chunk]
            gens = _generate(self.model, self.tokenizer, ids, max_new_tokens=max_tokens,
                             temperature=temperature, seed=self.seed + 1000 * call + j,
                             stop_token_ids=stops, engine=self._engine)
            texts += [self.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gens]
        return texts

    def choice_logprobs(self, messages: Messages, choices: list[str]) -> dict[str, float]:
        """log p(choice | prompt) = Σ_t log p(c_t | prompt, c_<t): teacher forcing of each choice
        string as the start of the assistant turn, all choices in one batch."""
        choice_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        prompt = self._prompt_ids(messages, max(len(c) for c in choice_ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scored = teacher_forced_logprobs(self.model, pad, [(prompt, c) for c in choice_ids])
        return {choice: float(sum(lp)) for choice, (lp, _) in zip(choices, scored)}


# ----------------------------------------------------------------------------- HTTP server


class OpenAIBackend:
    """Any server speaking OpenAI's ``/v1/chat/completions`` (``posttrain serve``, vLLM, OpenAI).

    HTTP 429 and 5xx, timeouts and connection failures are retried ``max_retries`` times with
    exponential backoff (``backoff_s · 2^attempt``, or the server's Retry-After when given); any
    other failure raises :class:`ServiceError` naming the URL and the HTTP status.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 3, backoff_s: float = 0.5, concurrency: int = 4,
                 seed: int | None = None, transport=None):
        """``transport``: an ``httpx`` transport to use instead of the network (tests)."""
        import httpx

        self.base_url, self.model = base_url.rstrip("/"), model
        self.url = f"{self.base_url}/chat/completions"
        self.name = f"openai:{self.base_url}#{model}"
        self.max_retries, self.backoff_s, self.concurrency, self.seed = max_retries, backoff_s, concurrency, seed
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport)

    def close(self) -> None:
        self._client.close()

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        try:
            delay = min(float(retry_after), 60.0) if retry_after else self.backoff_s * 2 ** attempt
        except ValueError:  # an HTTP-date Retry-After: fall back to our own schedule
            delay = self.backoff_s * 2 ** attempt
        time.sleep(delay)

    def _post(self, payload: dict) -> dict:
        import httpx

        for attempt in range(self.max_retries + 1):
            last_try = attempt == self.max_retries
            try:
                r = self._client.post(self.url, json=payload)
            except httpx.TransportError as e:
                if not last_try:
                    self._wait(attempt, None)
                    continue
                raise ServiceError(f"cannot reach {self.url} after {attempt + 1} attempt(s): "
                                   f"{type(e).__name__}: {e}", where=self.url,
                                   fix="check that the server is running and that the base URL is "
                                       "right (it usually ends in /v1)") from None
            if r.status_code == 429 or r.status_code >= 500:
                if not last_try:
                    self._wait(attempt, r.headers.get("retry-after"))
                    continue
                raise ServiceError(f"{self.url} answered HTTP {r.status_code} after {attempt + 1} "
                                   f"attempt(s): {_detail(r)}", where=self.url,
                                   fix="the server is overloaded or failing; retry later or lower "
                                       "the concurrency")
            if r.status_code != 200:
                hints = {401: "set the API key (backend.api_key_env names the environment variable)",
                         403: "check the API key's permissions",
                         404: "check the base URL (usually ends in /v1) and the model name after '#'"}
                raise ServiceError(f"{self.url} answered HTTP {r.status_code}: {_detail(r)}",
                                   where=self.url, fix=hints.get(r.status_code))
            try:
                return r.json()
            except ValueError:
                raise ServiceError(f"{self.url} answered HTTP 200 with a body that is not JSON: "
                                   f"{r.text[:200]!r}", where=self.url) from None
        raise AssertionError("unreachable")

    def _chat(self, messages: Messages, **fields) -> dict:
        payload = {"model": self.model, "messages": messages, **fields}
        if self.seed is not None:
            payload["seed"] = self.seed
        body = self._post(payload)
        try:
            body["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise ServiceError(f"{self.url} returned no choices[0].message: {str(body)[:200]}",
                               where=self.url) from None
        return body

    def complete(self, messages_list: list[Messages], max_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]:
        def one(messages: Messages) -> str:
            body = self._chat(messages, max_tokens=max_tokens, temperature=temperature)
            return body["choices"][0]["message"].get("content") or ""

        if self.concurrency <= 1 or len(messages_list) <= 1:
            return [one(m) for m in messages_list]
        with ThreadPoolExecutor(self.concurrency) as pool:  # map keeps the input order
            return list(pool.map(one, messages_list))

    def choice_logprobs(self, messages: Messages, choices: list[str]) -> dict[str, float]:
        """From the first generated token's top-5 alternatives: log p(choice) is the log-sum-exp of
        the entries whose stripped text equals the choice, and -inf when it is not among them. Only
        single-token choices (like 'A', 'B', 'C') can be scored this way."""
        body = self._chat(messages, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5)
        content = ((body["choices"][0].get("logprobs") or {}).get("content") or [])
        if not content:
            raise ServiceError(f"{self.url} returned no logprobs for a logprobs=true request",
                               where=self.url, fix="use a server that supports logprobs, or turn the "
                                                   "judge's logprob mode off")
        top = content[0].get("top_logprobs") or [content[0]]
        return {c: _logsumexp([e["logprob"] for e in top if e["token"].strip() == c]) for c in choices}


def _detail(response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message"))[:300]
        return str(body)[:300]
    except ValueError:
        return response.text[:300]


# ----------------------------------------------------------------------------- choosing one


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """'hf:PATH' -> ('hf', PATH, None); 'openai:URL#MODEL' -> ('openai', URL, MODEL)."""
    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        return "hf", rest, None
    if kind == "openai" and "#" in rest:
        url, _, model = rest.rpartition("#")
        if url.startswith(("http://", "https://")) and model:
            return "openai", url, model
    raise ConfigError(f"backend spec '{spec}' is not understood", where="backend spec",
                      fix="write hf:<model path or hub id> (e.g. hf:tiny) or openai:<base_url>#<model> "
                          "(e.g. openai:http://127.0.0.1:8000/v1#tiny)")


def backend_from_spec(spec: str, *, api_key: str | None = None, timeout: float = 120.0,
                      max_retries: int = 3, concurrency: int = 4, batch_size: int = 8,
                      seed: int = 0) -> ChatBackend:
    kind, target, model = parse_spec(spec)
    if kind == "hf":
        return HFBackend(target, batch_size=batch_size, seed=seed)
    return OpenAIBackend(target, model or "", api_key=api_key, timeout=timeout,
                         max_retries=max_retries, concurrency=concurrency, seed=seed)
