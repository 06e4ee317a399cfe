"""The token path and weight endpoints of `posttrain serve`, and the server rollout engine's protocol
handling against fakes: a vLLM-shaped server (token ids only in `token_id:<id>` log-prob tokens, weights
through /collective_rpc), servers without a reload endpoint, a transient connection failure, a hung
server; and the vLLM worker extension on a fake worker."""

import json
import socket
import threading
import time

import httpx
import pytest
import torch

from posttrain.engines.rollout import SamplingParams
from posttrain.engines.server_engine import ServerRolloutEngine
from posttrain.errors import ConfigError, ServiceError

TOKEN_REQ = {"max_tokens": 8, "temperature": 0, "logprobs": 0, "return_token_ids": True,
             "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def raw_server(tiny_path):
    """posttrain serve with the default raw log-probs, on the tiny model (which repeats one token)."""
    from posttrain.serving.openai_server import start_server_in_thread

    url, stop = start_server_in_thread(tiny_path, port=0)
    yield url
    stop()


def post(url, path, body):
    return httpx.post(url + path, json=body, timeout=60)


def test_token_path_mirrors_vllms_fields(raw_server, tokenizer, tiny_model):
    from posttrain.serving.generation import teacher_forced_logprobs

    prompt = tokenizer("Sort 3 1 2.")["input_ids"]
    r = post(raw_server, "/completions", {**TOKEN_REQ, "prompt": "Sort 3 1 2."})  # text in, ids out
    (c,) = r.json()["choices"]
    assert c["prompt_token_ids"] == prompt and len(c["token_ids"]) == 8 and c["finish_reason"] == "length"
    assert c["logprobs"]["tokens"] == [f"token_id:{t}" for t in c["token_ids"]]
    repeated = c["token_ids"][0]

    # a stop token that is not EOS ends the completion, is included, and is the stop_reason
    r = post(raw_server, "/completions", {**TOKEN_REQ, "prompt": [prompt, prompt], "stop_token_ids": [repeated]})
    for c in r.json()["choices"]:
        assert c["token_ids"] == [repeated] and c["finish_reason"] == "stop" and c["stop_reason"] == repeated
    # a stop string: the text is cut before it unless include_stop_str_in_output; the tokens are complete
    piece = tokenizer.decode([repeated])
    body = {**TOKEN_REQ, "prompt": prompt, "stop": [piece + piece]}
    c = post(raw_server, "/completions", body).json()["choices"][0]
    assert c["stop_reason"] == piece + piece and c["text"] == "" and len(c["token_ids"]) == 2
    c = post(raw_server, "/completions", {**body, "include_stop_str_in_output": True}).json()["choices"][0]
    assert c["text"] == piece + piece

    # raw mode: the model's own log-softmax at any temperature, k alternatives keyed like the tokens
    body = {**TOKEN_REQ, "prompt": [prompt], "temperature": 0.7, "seed": 1, "n": 2, "logprobs": 2}
    choices = post(raw_server, "/completions", body).json()["choices"]
    tf = teacher_forced_logprobs(tiny_model, tokenizer.pad_token_id, [(prompt, c["token_ids"]) for c in choices], 2)
    for c, (lp, top) in zip(choices, tf):
        assert c["logprobs"]["token_logprobs"] == pytest.approx(lp, abs=1e-4)
        assert [list(d) for d in c["logprobs"]["top_logprobs"]] == [[f"token_id:{a}" for a, _ in t] for t in top]


def test_token_fields_need_the_token_path_and_versions_are_checked(raw_server):
    r = post(raw_server, "/completions", {"prompt": "hi", "top_k": 3})
    assert r.status_code == 400 and "return_token_ids" in r.json()["error"]["message"]
    r = post(raw_server, "/completions", {**TOKEN_REQ, "prompt": [[1, 2]], "posttrain_weights_version": 4})
    assert r.status_code == 409 and "holds weights version 0" in r.json()["error"]["message"]
    r = post(raw_server, "/completions", {**TOKEN_REQ, "prompt": [[1, 10**9]]})
    assert r.status_code == 400 and "token ids must be in" in r.json()["error"]["message"]
    r = post(raw_server, "/completions", {**TOKEN_REQ, "prompt": [[1, 2], [3]], "posttrain_seeds": [5]})
    assert r.status_code == 400 and "one non-negative seed per prompt: 1 seeds for 2 prompts" in r.json()["error"]["message"]


def test_weight_reload_endpoint(tiny_path, tmp_path):
    from safetensors.torch import save_model

    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_causal_lm
    from posttrain.serving.openai_server import start_server_in_thread

    url, stop = start_server_in_thread(tiny_path, port=0)
    root = url.removesuffix("/v1")
    try:
        assert httpx.get(root + "/posttrain/weights").json() == {"version": 0, "logprobs_mode": "raw_logprobs",
                                                                 "model": tiny_path}
        r = httpx.post(root + "/posttrain/weights", json={"path": str(tmp_path / "missing.safetensors"), "version": 1})
        assert r.status_code == 400 and "no file" in r.json()["error"]["message"]
        save_model(torch.nn.Linear(2, 2), str(tmp_path / "other.safetensors"))  # not this model
        r = httpx.post(root + "/posttrain/weights", json={"path": str(tmp_path / "other.safetensors"), "version": 1})
        assert r.status_code == 400 and "cannot load" in r.json()["error"]["message"]
        assert httpx.get(root + "/health").json()["weights_version"] == -1  # refuses checked requests now
        model = load_causal_lm(ModelConfig(name_or_path=tiny_path))
        save_model(model, str(tmp_path / "w.safetensors"))
        r = httpx.post(root + "/posttrain/weights", json={"path": str(tmp_path / "w.safetensors"), "version": 7})
        assert r.status_code == 200 and r.json()["version"] == 7
        r = post(url, "/completions", {**TOKEN_REQ, "prompt": [[1, 2]], "posttrain_weights_version": 7})
        assert r.status_code == 200
    finally:
        stop()


def test_raw_logprob_servers_are_refused_where_raw_is_not_the_sampling_distribution(raw_server, tiny_model, tmp_path):
    engine = ServerRolloutEngine([raw_server], tiny_model, weights_dir=str(tmp_path))
    try:
        ok = engine.generate([[1, 5, 6]], SamplingParams(max_new_tokens=3, temperature=1.0, seed=0))
        assert len(ok) == 1 and len(ok[0].logprobs) == 3
        with pytest.raises(ConfigError, match="logprobs_mode=processed_logprobs"):
            engine.generate([[1, 5, 6]], SamplingParams(max_new_tokens=3, temperature=0.7))
    finally:
        engine.close()
    assert tmp_path.exists() and not list(tmp_path.iterdir())  # its own files removed, the directory kept


# ----------------------------------------------------------------------------- fakes


class FakeVLLM:
    """The responses of vllm serve (>= 0.10.2, dev mode, posttrain's worker extension) the client reads;
    ``token_ids`` left out, as a server without return_token_ids answers."""

    def __init__(self, rpc_status=200, fail_first_completion=False):
        self.rpc_status, self.fail_first = rpc_status, fail_first_completion
        self.requests, self.version = [], "0"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model"}]})
        if path == "/collective_rpc":
            if self.rpc_status != 200:
                return httpx.Response(self.rpc_status, json={"detail": "no such method"})
            if body["method"] == "posttrain_load_weights":
                self.version = body["args"][1]
            return httpx.Response(200, json={"results": [self.version]})
        if path == "/reset_prefix_cache":
            return httpx.Response(200)
        if path == "/v1/completions":
            if self.fail_first:
                self.fail_first = False
                raise httpx.ConnectError("connection reset", request=request)
            choices = []
            for i, p in enumerate(body["prompt"]):
                for j in range(body["n"]):
                    ids = [p[-1] + j, 2] if j % 2 == 0 else [p[-1] + j, 7, 8]
                    choices.append({"index": i * body["n"] + j, "text": "x",
                                    "finish_reason": "stop" if j % 2 == 0 else "length",
                                    "stop_reason": 2 if j % 2 == 0 else None,
                                    "logprobs": {"tokens": [f"token_id:{t}" for t in ids],
                                                 "token_logprobs": [-0.5] * len(ids), "top_logprobs": None,
                                                 "text_offset": [0] * len(ids)}})
            return httpx.Response(200, json={"object": "text_completion", "choices": choices[::-1]})
        return httpx.Response(404, json={"detail": "Not Found"})


def test_a_vllm_server_is_driven_through_collective_rpc(tmp_path):
    fake = FakeVLLM()
    engine = ServerRolloutEngine(["http://vllm:8000/v1"], torch.nn.Linear(2, 2), weights_dir=str(tmp_path),
                                 transport=httpx.MockTransport(fake))
    try:
        calls = [(m, p, b and b.get("method")) for m, p, b in fake.requests]
        assert calls[:3] == [("GET", "/v1/models", None), ("GET", "/posttrain/weights", None),
                             ("POST", "/collective_rpc", "posttrain_weights_version")]
        load = next(b for _, p, b in fake.requests
                    if p == "/collective_rpc" and b["method"] == "posttrain_load_weights")
        assert load["args"][1] == "1" and load["args"][0].endswith("-1.safetensors")
        assert fake.requests[-1][1] == "/reset_prefix_cache" and fake.version == "1"

        out = engine.generate([[5, 6], [9]], SamplingParams(max_new_tokens=4, n=2, stop_token_ids=[2], seed=3))
        assert [r.completion_ids for r in out] == [[6, 2], [7, 7, 8], [9, 2], [10, 7, 8]]  # prompt-major order
        assert [r.finish_reason for r in out] == ["stop", "length", "stop", "length"]
        assert [r.prompt_ids for r in out] == [[5, 6], [5, 6], [9], [9]]
        body = fake.requests[-1][2]
        assert body["prompt"] == [[5, 6], [9]] and body["model"] == "m" and body["seed"] == 3
        assert body["stop_token_ids"] == [2] and body["ignore_eos"] is True and body["return_token_ids"] is True
        assert "posttrain_weights_version" not in body  # vLLM would only log it as ignored
    finally:
        engine.close()


def test_servers_that_cannot_reload_weights_are_refused_at_start():
    with pytest.raises(ServiceError, match="no weight-reload endpoint") as e:
        ServerRolloutEngine(["http://plain:8000/v1"], transport=httpx.MockTransport(FakeVLLM(rpc_status=404)))
    assert "VLLM_SERVER_DEV_MODE=1" in str(e.value)
    with pytest.raises(ServiceError, match="worker-extension-cls"):
        ServerRolloutEngine(["http://vllm:8000/v1"], transport=httpx.MockTransport(FakeVLLM(rpc_status=500)),
                            retries=0)


def test_a_failed_connection_is_retried_with_the_same_request(tmp_path):
    fake = FakeVLLM(fail_first_completion=True)
    engine = ServerRolloutEngine(["http://vllm:8000"], weights_dir=str(tmp_path), backoff_s=0.01,
                                 transport=httpx.MockTransport(fake))
    out = engine.generate([[5]], SamplingParams(max_new_tokens=4, seed=1))
    assert out[0].completion_ids == [5, 2]
    sent = [b for _, p, b in fake.requests if p == "/v1/completions"]
    assert len(sent) == 2 and sent[0] == sent[1]
    engine.close()


def test_a_hung_server_is_an_error_after_the_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()  # never answers
    t0 = time.monotonic()
    try:
        with pytest.raises(ServiceError, match="no answer within 1 s"):
            ServerRolloutEngine([f"http://127.0.0.1:{listener.getsockname()[1]}/v1"], timeout_s=1)
        assert time.monotonic() - t0 < 5  # a timeout is not retried
    finally:
        listener.close()
        for conn, _ in accepted:
            conn.close()


def test_the_vllm_worker_extension_loads_the_file_into_the_model(tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import save_model

    from posttrain.serving.vllm_worker import WeightReload

    src = torch.nn.Linear(3, 2)
    save_model(src, str(tmp_path / "w.safetensors"))
    got = {}

    class Worker(WeightReload):
        model_runner = SimpleNamespace(model=SimpleNamespace(load_weights=lambda weights: got.update(weights)))

    w = Worker()
    assert w.posttrain_weights_version() == "0"
    assert w.posttrain_load_weights(str(tmp_path / "w.safetensors"), "3") == "3"
    assert w.posttrain_weights_version() == "3"
    assert set(got) == {"weight", "bias"} and torch.equal(got["weight"], src.weight.detach())
