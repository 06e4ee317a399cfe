"""On-policy distillation (posttrain distill): the advantage math by hand, the refusals, and learning."""

import json

import pytest
import torch

from posttrain.advantages import distillation_advantages
from posttrain.config import load_config
from posttrain.errors import ConfigError


def test_per_token_advantages_are_teacher_minus_student_on_valid_tokens():
    s = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    t = torch.tensor([[-0.5, -2.5, -0.5], [-0.3, -1.0, -9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    a = distillation_advantages(s, t, m)
    assert torch.allclose(a, torch.tensor([[0.5, -0.5, 0.0], [-0.2, 2.0, 0.0]]))
    # γ = 1: reward-to-go, Σ_{k>=t} r_k over the valid tokens of each row (the masked one is skipped)
    a1 = distillation_advantages(s, t, m, gamma=1.0)
    assert torch.allclose(a1, torch.tensor([[0.0, -0.5, 0.0], [1.8, 2.0, 0.0]]))
    a5 = distillation_advantages(s, t, m, gamma=0.5)
    assert torch.allclose(a5, torch.tensor([[0.5 - 0.25, -0.5, 0.0], [-0.2 + 1.0, 2.0, 0.0]]))


def test_a_student_equal_to_its_teacher_gets_no_signal():
    lp = torch.randn(4, 6)
    assert distillation_advantages(lp, lp.clone(), torch.ones(4, 6)).abs().max() == 0


def test_distill_needs_a_teacher_with_the_students_tokenizer(monkeypatch, tiny_path):
    from posttrain.algorithms import distill

    with pytest.raises(ConfigError, match="distillation needs a teacher"):
        load_config(distill.DistillConfig, None, [f"model.name_or_path={tiny_path}"])

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    vocabs = {"student": {"a": 0, "b": 1}, "teacher": {"a": 0, "c": 1}}
    monkeypatch.setattr(distill, "tokenizer_for", lambda cfg: Tok(vocabs[cfg.name_or_path]))
    cfg = load_config(distill.DistillConfig, None, ["model.name_or_path=student", "teacher.name_or_path=teacher"],
                      check=False)
    with pytest.raises(ConfigError, match=r"different tokenizers \(2 vocabulary entries differ\)"):
        distill.check_same_tokenizer(cfg.model, cfg.teacher)


@pytest.mark.slow
def test_on_policy_distillation_moves_the_student_toward_a_stronger_teacher(sft_policy, grpo_teacher, tmp_path):
    """The SFT student (held-out accuracy ~0.64) distilled on its own samples from the GRPO teacher
    (~0.77): its accuracy rises and its reverse KL to the teacher falls."""
    from posttrain.algorithms.distill import DistillConfig, run

    cfg = load_config(DistillConfig, None, [
        f"model.name_or_path={sft_policy}", f"teacher.name_or_path={grpo_teacher}", f"train.output_dir={tmp_path}",
        "rollout.prompts_per_step=32", "rollout.group_size=4", "train.max_steps=20", "train.lr=1e-4",
        "train.progress=false", "task_eval_prompts=64", "task_eval_samples=4"])
    s = run(cfg)
    assert s["final"]["accuracy"] > s["initial"]["accuracy"] + 0.04, (s["initial"], s["final"])
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kl = [r["distill/reverse_kl"] for r in rows if "distill/reverse_kl" in r]
    assert sum(kl[-3:]) / 3 < 0.5 * sum(kl[:3]) / 3, kl
    assert s["teacher"] == grpo_teacher and "teacher_s" in rows[1]


# ----------------------------------------------------------------------------- the teacher on a server

@pytest.mark.parametrize("overrides, match, where", [
    (["teacher.name_or_path=t", "teacher_server=http://127.0.0.1:1/v1"], "both teacher.name_or_path", "teacher_server"),
    (["teacher_server=127.0.0.1:8001"], "not an http", "teacher_server"),
    (["teacher_server=[http://127.0.0.1:1/v1]", "rollout.temperature=0.7"], "raw log-probs", "rollout.temperature"),
])
def test_teacher_server_config_refusals(tiny_path, overrides, match, where):
    from posttrain.algorithms.distill import DistillConfig

    with pytest.raises(ConfigError, match=match) as err:
        load_config(DistillConfig, None, [f"model.name_or_path={tiny_path}", *overrides])
    assert err.value.where == where and err.value.fix
    with pytest.raises(ConfigError, match="teacher_server=<URL"):  # the fix names both ways to give a teacher
        load_config(DistillConfig, None, [f"model.name_or_path={tiny_path}"])
    cfg = load_config(DistillConfig, None, [f"model.name_or_path={tiny_path}", "teacher_server=http://h:1/v1"])
    assert cfg.teacher_server == ["http://h:1/v1"] and not cfg.teacher.name_or_path  # one URL = a list of one


def _fake_teacher(name_of, status=200):
    """A vLLM-like teacher server (no /posttrain routes) whose prompt_logprobs name token t ``name_of(t)``."""
    import httpx

    from posttrain.engines.server_engine import ServerRolloutEngine

    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "teacher"}]})
        if request.url.path == "/v1/completions" and status == 200:
            body = json.loads(request.content)
            assert body["prompt_logprobs"] == 0 and body["max_tokens"] == 1  # vLLM needs a token to generate
            return httpx.Response(200, json={"choices": [
                {"index": i, "text": "", "prompt_logprobs": [None] + [
                    {str(t): {"logprob": -1.0, "rank": 1, **({} if name_of(t) is None else
                                                              {"decoded_token": name_of(t)})}} for t in p[1:]]}
                for i, p in enumerate(body["prompt"])]})
        if request.url.path == "/v1/completions":
            return httpx.Response(status, json={"error": {"message": "Token id 329 is out of vocabulary"}})
        return httpx.Response(404, json={"error": {"message": "not found"}})

    return ServerRolloutEngine(["http://teacher.test/v1"], sync_weights=False, retries=0,
                               transport=httpx.MockTransport(handler))


def test_a_teacher_server_with_another_vocabulary_is_refused(tokenizer):
    from posttrain.algorithms.distill import check_server_tokenizer

    n = len(tokenizer)
    ok = [lambda t: tokenizer.decode([t]), tokenizer.convert_ids_to_tokens,  # what vLLM versions return
          lambda t: " " + tokenizer.decode([t]) if t % 7 == 0 else tokenizer.decode([t]),  # leading spaces aside
          lambda t: None]  # no decoded_token: nothing to compare (a warning)
    for name_of in ok:
        client = _fake_teacher(name_of)
        try:
            check_server_tokenizer(client, tokenizer)
        finally:
            client.close()
    for name_of, status, match in [(lambda t: tokenizer.decode([(t + 1) % n]), 200, r"decodes \d+ of \d+ probed"),
                                   (lambda t: "x", 400, "refused the student's token ids")]:
        client = _fake_teacher(name_of, status)
        try:
            with pytest.raises(ConfigError, match=match) as err:
                check_server_tokenizer(client, tokenizer)
            assert err.value.where == "teacher_server"
        finally:
            client.close()


@pytest.mark.slow
def test_a_teacher_on_a_server_gives_the_local_teachers_numbers(tiny_path, tmp_path):
    """The same 2-step run with the teacher loaded locally and served by `posttrain serve` on loopback:
    the same reverse KL to the teacher at every step (the same teacher log-probs, hence the same update).
    With kl.track the KL to the initial student is logged too (it changes nothing in the update)."""
    from posttrain.algorithms.distill import DistillConfig, run
    from posttrain.serving.openai_server import start_server_in_thread
    from pt_helpers import noisy_copy

    teacher = noisy_copy(tiny_path, tmp_path / "teacher")  # a different model, the same tokenizer
    common = [f"model.name_or_path={tiny_path}", "rollout.prompts_per_step=4", "rollout.group_size=2",
              "train.max_steps=2", "train.lr=1e-4", "train.progress=false", "task_eval_prompts=4",
              "task_eval_samples=1"]
    run(load_config(DistillConfig, None, [*common, f"teacher.name_or_path={teacher}", "kl.track=true",
                                          f"train.output_dir={tmp_path / 'local'}"]))
    url, stop = start_server_in_thread(str(teacher), port=0)
    try:
        s = run(load_config(DistillConfig, None, [*common, f"teacher_server={url}",
                                                  f"train.output_dir={tmp_path / 'server'}"]))
    finally:
        stop()
    kl = {}
    for name in ("local", "server"):
        rows = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        kl[name] = [r["distill/reverse_kl"] for r in rows if "distill/reverse_kl" in r]
    assert len(kl["server"]) == 2 and kl["server"][0] > 0.01, kl  # the teacher differs from the student
    assert kl["server"] == pytest.approx(kl["local"], abs=1e-4), kl
    assert s["teacher"] == f"{teacher} at {url}"
    # kl.track (the local run): the KL to the initial student is logged (a sample estimate), 0 before the
    # first update and not after it
    local = [json.loads(r) for r in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in local if "distill/reverse_kl" in r]
    assert len(kls) == 2 and kls[0] == pytest.approx(0, abs=1e-6) and abs(kls[1]) > 1e-4, kls
