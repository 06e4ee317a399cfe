"""`posttrain serve` end to end on loopback with the tiny model, and the OpenAI backend against it."""

import math
import re
import socket

import httpx
import pytest

from posttrain.errors import ServiceError
from posttrain.judges.backends import OpenAIBackend
from posttrain.judges.pairwise import Pair, judge_pairs, parse_verdict, summarize

CHAT = [{"role": "user", "content": "Sort the numbers 3 1 2."}]


@pytest.fixture(scope="module")
def server():
    from posttrain.serving.openai_server import start_server_in_thread

    base_url, stop = start_server_in_thread("tiny", port=0, max_tokens_cap=64, default_max_tokens=16)
    yield base_url
    stop()


def post(base_url, path, body):
    return httpx.post(base_url + path, json=body, timeout=120)


def test_health_and_models(server):
    assert httpx.get(server.removesuffix("/v1") + "/health").json()["status"] == "ok"
    models = httpx.get(server + "/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"


def test_chat_completion_shape_and_logprobs(server):
    r = post(server, "/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 10,
                                           "temperature": 0, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    entries = choice["logprobs"]["content"]
    assert len(entries) == usage["completion_tokens"] > 0
    for e in entries:
        assert math.isfinite(e["logprob"]) and e["logprob"] <= 0
        assert isinstance(e["token"], str) and all(0 <= b < 256 for b in e["bytes"])
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        # greedy decoding emits the most likely token (tolerance: fast decode vs full forward)
        assert e["logprob"] == pytest.approx(tops[0], abs=1e-4)


def test_seed_reproduces_samples(server):
    req = {"messages": CHAT, "max_tokens": 12, "temperature": 1.0, "n": 2, "seed": 11}
    texts = lambda r: [c["message"]["content"] for c in r.json()["choices"]]  # noqa: E731
    first, again = texts(post(server, "/chat/completions", req)), texts(post(server, "/chat/completions", req))
    other = texts(post(server, "/chat/completions", {**req, "seed": 12}))
    assert first == again and len(first) == 2
    assert other != first


def test_legacy_completions(server):
    r = post(server, "/completions", {"prompt": ["Sort 2 1.", "Reverse 1 2."], "max_tokens": 5,
                                      "temperature": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    for c in body["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert all(math.isfinite(x) and x <= 0 for x in lp["token_logprobs"])
        assert all(len(t) <= 2 for t in lp["top_logprobs"])


@pytest.mark.parametrize("body, status, param", [
    ({"max_tokens": 65}, 400, "max_tokens"),  # over this server's cap of 64
    ({"logprobs": True, "top_logprobs": 6}, 400, "top_logprobs"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),  # without logprobs=true
    ({"stream": True}, 400, "stream"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"best_of": 2}, 400, "best_of"),  # unknown fields are errors, not ignored
    ({"model": "gpt-4"}, 404, "model"),
    ({"messages": []}, 400, "messages"),
])
def test_request_errors_use_the_openai_error_shape(server, body, status, param):
    r = post(server, "/chat/completions", {"messages": CHAT, "max_tokens": 4, **body})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_stop_strings_cut_the_text():
    from posttrain.models.loading import load_tokenizer
    from posttrain.serving.generation import cut_at_stop

    tok = load_tokenizer("tiny")
    ids = tok("Sort the numbers 4 1 7.", add_special_tokens=False)["input_ids"]
    text, keep, hit = cut_at_stop(tok, ids, ["numbers"])
    assert hit and text == "Sort the "
    assert tok.decode(ids[:keep]) == text[:len(tok.decode(ids[:keep]))]
    assert len(tok.decode(ids[:keep + 1])) > len(text)
    assert cut_at_stop(tok, ids, ["zzz"]) == ("Sort the numbers 4 1 7.", len(ids), False)


def test_openai_backend_judges_both_orders_through_the_server(server):
    backend = OpenAIBackend(server, "tiny", max_retries=0, concurrency=2)
    replies = backend.complete([CHAT, [{"role": "user", "content": "Hi"}]], max_tokens=6)
    assert len(replies) == 2 and all(isinstance(t, str) for t in replies)
    pairs = [Pair("Sort 2 1.", "1 2", "2 1"), Pair("Reverse 1 2.", "2 1", "1 2")]
    judgments = judge_pairs(backend, pairs, max_tokens=16)
    raws = [t for j in judgments for t in j.raw.values()]
    assert len(raws) == 4  # two pairs, both orders
    # the random-init judge rarely writes a verdict; the counts must match what it wrote
    s = summarize(judgments)
    assert s["verdicts"] == 4
    assert s["unparseable_verdicts"] == sum(parse_verdict(t) is None for t in raws)
    assert s["unparseable_pairs"] == sum(any(parse_verdict(t) is None for t in j.raw.values())
                                         for j in judgments)
    letters = backend.choice_logprobs([{"role": "user", "content": "A or B?"}], ["A", "B", "C"])
    assert set(letters) == {"A", "B", "C"} and all(v <= 0 for v in letters.values())
    backend.close()


def test_judge_command_over_http(server, tmp_path):
    from posttrain.config import load_config
    from posttrain.judges.commands import JudgeConfig, run_judge

    cfg = load_config(JudgeConfig, None, [f"judge=openai:{server}#tiny", "max_pairs=2", "max_tokens=8",
                                          f"output_dir={tmp_path / 'run'}",
                                          "max_unparseable=1.0"])  # the untrained tiny judge: plumbing only
    summary = run_judge(cfg)
    assert summary["pairs"] == 2 and summary["verdicts"] == 4
    assert summary["human"]["labels"] == 2
    assert summary["human"]["n"] + summary["human"]["skipped"] == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_names_the_url():
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    backend = OpenAIBackend(url, "tiny", max_retries=1, backoff_s=0.01)
    with pytest.raises(ServiceError, match=re.escape(url + "/chat/completions")) as err:
        backend.complete([CHAT])
    assert "2 attempt(s)" in str(err.value)


def _backend(statuses, **kw):
    """An OpenAIBackend over a fake transport answering with ``statuses`` in turn."""
    calls = []

    def handler(request):
        status = statuses[min(len(calls), len(statuses) - 1)]
        calls.append(request)
        if status == 200:
            return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "[[A]]"}}]})
        return httpx.Response(status, json={"error": {"message": f"status {status}"}},
                              headers={"retry-after": "0"} if status == 429 else {})

    backend = OpenAIBackend("http://judge.test/v1", "m", backoff_s=0.001,
                            transport=httpx.MockTransport(handler), **kw)
    return backend, calls


def test_retries_on_429_and_5xx_then_succeeds():
    backend, calls = _backend([429, 503, 200], max_retries=3)
    assert backend.complete([CHAT]) == ["[[A]]"]
    assert len(calls) == 3 and calls[-1].url == "http://judge.test/v1/chat/completions"


def test_gives_up_after_max_retries_with_status():
    backend, calls = _backend([500], max_retries=2)
    with pytest.raises(ServiceError, match=r"http://judge.test/v1/chat/completions answered HTTP 500 after 3"):
        backend.complete([CHAT])
    assert len(calls) == 3


def test_client_errors_are_not_retried():
    backend, calls = _backend([401], max_retries=3)
    with pytest.raises(ServiceError, match="HTTP 401") as err:
        backend.complete([CHAT])
    assert len(calls) == 1 and "API key" in str(err.value)


def test_teacher_forced_logprobs_match_one_token_at_a_time():
    """The batched, right-padded scorer against the obvious reference: one forward per token."""
    import torch

    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_causal_lm
    from posttrain.serving.generation import teacher_forced_logprobs

    model = load_causal_lm(ModelConfig(name_or_path="tiny")).eval()
    rows = [([5, 17, 42, 9], [100, 7, 300]), ([8, 3], [11, 250, 4, 60, 2]), ([9], [])]
    scored = teacher_forced_logprobs(model, 0, rows, top_k=2)
    for (prompt, cont), (lps, tops) in zip(rows, scored):
        assert len(lps) == len(tops) == len(cont)
        for t, token in enumerate(cont):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + cont[:t]])).logits[0, -1]
            ref = torch.log_softmax(logits.float(), -1)
            assert lps[t] == pytest.approx(float(ref[token]), abs=1e-4)
            best = ref.topk(2)
            assert [i for i, _ in tops[t]] == best.indices.tolist()


def test_teacher_forced_logprobs_with_the_head_at_continuations_only_equal_the_full_forward(monkeypatch):
    """The server's scorer runs the LM head only at each continuation's positions (no [batch, length,
    vocab] logits); log-probs, top alternatives and the processed (temperature/top-p) log-probs equal
    those of the full forward."""
    from posttrain.config import ModelConfig
    from posttrain.engines.rollout import SamplingParams
    from posttrain.models import forward
    from posttrain.models.loading import load_causal_lm
    from posttrain.serving.generation import teacher_forced_logprobs

    model = load_causal_lm(ModelConfig(name_or_path="tiny")).eval()
    assert forward.separable_head(model)[1] is not None  # the tiny Llama takes the head-apart path
    rows = [([5, 17, 42, 9], [100, 7, 300]), ([8, 3], [11, 250, 4, 60, 2]), ([9], [])]
    processed = SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9)
    apart = [teacher_forced_logprobs(model, 0, rows, top_k=3, processed=p) for p in (None, processed)]
    monkeypatch.setattr(forward, "_HEAD_SLICE_ARCHS", ())
    full = [teacher_forced_logprobs(model, 0, rows, top_k=3, processed=p) for p in (None, processed)]
    for a_run, f_run in zip(apart, full):
        for (la, ta), (lf, tf) in zip(a_run, f_run):
            assert la == pytest.approx(lf, abs=1e-5)
            assert [[i for i, _ in t] for t in ta] == [[i for i, _ in t] for t in tf]


# ----------------------------------------------------------------------------- prompt_logprobs (a server teacher)

SEQS = [([5, 17, 42, 9], [100, 7, 300]), ([8, 3], [11, 250, 4, 60, 2]), ([8, 3], [11, 40]), ([9], [77])]


def _local_teacher_logps(seqs):
    """What distill's local teacher computes: ref_logp_fn over packed micro-batches (collate_shared)."""
    import torch

    from posttrain.config import ModelConfig
    from posttrain.models.forward import collate_shared, ref_logp_fn
    from posttrain.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path="tiny")).eval()
    batch = collate_shared([p for p, _ in seqs], [c for _, c in seqs])
    with torch.no_grad():
        flat, seq, j = ref_logp_fn(model, None, 1.0)(batch)
    out = [[0.0] * len(c) for _, c in seqs]
    for v, s, t in zip(flat.tolist(), seq.tolist(), j.tolist()):
        out[s][t] = v
    return model, out


def test_prompt_logprobs_have_vllms_layout_and_the_local_models_numbers(server):
    import torch

    model, local = _local_teacher_logps(SEQS)
    r = post(server, "/completions", {"model": "tiny", "prompt": [p + c for p, c in SEQS], "max_tokens": 0,
                                      "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == len(SEQS) and body["usage"]["completion_tokens"] == 0
    for (p, c), choice, ref in zip(SEQS, body["choices"], local):
        assert choice["text"] == "" and choice["finish_reason"] == "length"
        lps = choice["prompt_logprobs"]
        assert len(lps) == len(p) + len(c) and lps[0] is None
        for pos, token in enumerate((p + c)[1:], 1):
            entry = lps[pos]
            assert str(token) in entry and 1 <= len(entry) <= 3  # the token itself + the 2 likeliest
            assert all(set(e) == {"logprob", "rank", "decoded_token"} for e in entry.values())
            by_rank = sorted(entry.values(), key=lambda e: e["rank"])
            assert [e["rank"] for e in by_rank][:2] == [1, 2]
            assert [e["logprob"] for e in by_rank] == sorted((e["logprob"] for e in by_rank), reverse=True)
            with torch.no_grad():  # the rank of the token in the model's own distribution
                logits = model(input_ids=torch.tensor([(p + c)[:pos]])).logits[0, -1]
            assert entry[str(token)]["rank"] == int((logits > logits[token]).sum()) + 1
        got = [lps[len(p) + t][str(tok)]["logprob"] for t, tok in enumerate(c)]
        assert got == pytest.approx(ref, abs=1e-5)  # = the local teacher's log-probs of the same tokens


def test_prompt_logprobs_with_generation_and_n(server):
    r = post(server, "/completions", {"prompt": [5, 17, 42, 9], "max_tokens": 1, "n": 2, "temperature": 1.0,
                                      "seed": 3, "prompt_logprobs": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    a, b = r.json()["choices"]
    assert len(a["token_ids"]) == 1 and a["prompt_token_ids"] == [5, 17, 42, 9]
    assert a["prompt_logprobs"] == b["prompt_logprobs"] and a["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in a["prompt_logprobs"][1:])  # k = 0: the token alone


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Sort 2 1.", "prompt_logprobs": 0}, "prompt"),  # token-id prompts only
    ({"prompt": [5, 6], "max_tokens": 0}, "max_tokens"),  # 0 only when scoring
    ({"prompt": [5, 6], "max_tokens": 0, "prompt_logprobs": 6}, "prompt_logprobs"),  # ≤ 5
    ({"prompt": [5, 6], "max_tokens": 0, "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt": [5, 6], "max_tokens": 0, "prompt_logprobs": 0, "echo": True}, "echo"),  # still refused
    ({"prompt": [5, 100000], "max_tokens": 0, "prompt_logprobs": 0}, "prompt"),  # beyond the vocabulary
    ({"prompt": [[5, 6], []], "max_tokens": 0, "prompt_logprobs": 0}, "prompt"),
])
def test_prompt_logprobs_request_errors(server, body, param):
    r = post(server, "/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_server_engine_scores_completions_like_the_local_teacher(server):
    from posttrain.engines.server_engine import ServerRolloutEngine
    from posttrain.errors import ConfigError

    _, local = _local_teacher_logps(SEQS)
    engine = ServerRolloutEngine([server, server], sync_weights=False, timeout_s=60)
    try:
        assert engine.weights_dir is None and [s.kind for s in engine.servers] == ["posttrain"] * 2
        got = engine.score([p for p, _ in SEQS], [c for _, c in SEQS], batch_size=1)  # 2 servers x 2 requests
        assert [len(g) for g in got] == [len(c) for _, c in SEQS]
        assert [x for g in got for x in g] == pytest.approx([x for r in local for x in r], abs=1e-5)
        with pytest.raises(ConfigError, match="read-only"):
            engine.update_weights(object())
    finally:
        engine.close()


def test_server_engine_scoring_names_a_server_without_prompt_logprobs():
    from posttrain.engines.server_engine import ServerRolloutEngine

    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if request.url.path == "/v1/completions":  # an OpenAI-compatible server that ignores the field
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x"}]})
        return httpx.Response(404, json={"error": {"message": "not found"}})

    engine = ServerRolloutEngine(["http://teacher.test/v1"], sync_weights=False, retries=0,
                                 transport=httpx.MockTransport(handler))
    try:
        assert engine.servers[0].kind == "vllm"  # read-only: no reload endpoint needed
        with pytest.raises(ServiceError, match=r"returned no prompt_logprobs for a 3-token prompt"):
            engine.score([[1, 2]], [[3]])
    finally:
        engine.close()
