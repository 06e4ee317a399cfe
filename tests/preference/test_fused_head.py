"""The LM head fused with the log-softmax (no [tokens, vocab] logits for the batch) gives the same
sequence log-probs and gradients as the full forward, on both packed layouts; and lm_head_logps equals
selective_log_softmax of the full logits (values and gradients, fp32 and fp64, with a temperature)."""

import copy

import pytest
import torch

from posttrain.logprobs import lm_head_logps, selective_log_softmax


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lm_head_logps_equals_the_unfused_path(dtype, tol, temperature):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(101, 16, dtype=dtype, generator=g, requires_grad=True)
    ids = torch.randint(0, 101, (37,), generator=g)
    a = lm_head_logps(h, w, ids, chunk_size=8, temperature=temperature)
    b = selective_log_softmax(h @ w.t(), ids, temperature=temperature)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    up = torch.randn(37, dtype=a.dtype, generator=g)
    ga, gb = torch.autograd.grad((a * up).sum(), (h, w)), torch.autograd.grad((b * up).sum(), (h, w))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_lm_head_logps_gradcheck():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([0, 3, 6, 1, 2])
    assert torch.autograd.gradcheck(lambda h, w: lm_head_logps(h, w, ids, 2, temperature=1.3), (h, w))


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_sequence_logps_fused_equals_full_forward(tiny_model, shared_prompt, monkeypatch):
    from posttrain.data.preference import batch_records, encode_pair
    from posttrain.models import forward
    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer()
    rows = [{"prompt": f"Sort the numbers {i} 3 1.", "chosen": "1 3 " + str(i), "rejected": "no idea " * (i % 3 + 1)}
            for i in range(6)]
    batch = batch_records([encode_pair(tok, r, 64) for r in rows], shared_prompt=shared_prompt, packing=True,
                          pad_id=tok.pad_token_id)

    def run():
        tiny_model.zero_grad()
        sums, counts = forward.sequence_logps(tiny_model, batch)
        (sums * torch.linspace(-1, 1, sums.numel())).sum().backward()
        return sums.detach(), counts, [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]

    fused = run()
    monkeypatch.setattr(forward, "_HEAD_SLICE_ARCHS", ())  # the full forward + gather path
    full = run()
    torch.testing.assert_close(fused[0], full[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(fused[1], full[1]) and fused[1].sum() > 0
    for a, b in zip(fused[2], full[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sft_loss_fused_equals_full_forward(tiny_model, monkeypatch):
    """SFT's loss, gradient and token accuracy with the fused head equal the full-logits path."""
    from posttrain.algorithms.sft import count_tokens, sft_loss
    from posttrain.data.batching import collate
    from posttrain.data.chat import encode_sft
    from posttrain.models import forward
    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer()
    exs = [encode_sft(tok, {"messages": [{"role": "user", "content": f"Sort the numbers {i} 2 7."},
                                         {"role": "assistant", "content": f"2 {i} 7"},
                                         {"role": "user", "content": "Again?"},
                                         {"role": "assistant", "content": "Yes."}]}, 128) for i in range(5)]
    batch = collate(exs, packing=True, pad_id=tok.pad_token_id)

    def run():
        tiny_model.zero_grad()
        loss, m = sft_loss(tiny_model, batch, count_tokens(batch))
        loss.backward()
        return loss.detach(), m["token_accuracy"], [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]

    fused = run()
    monkeypatch.setattr(forward, "_HEAD_SLICE_ARCHS", ())
    full = run()
    torch.testing.assert_close(fused[0], full[0], rtol=1e-6, atol=1e-6)
    assert float(fused[1]) == float(full[1])
    for a, b in zip(fused[2], full[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lm_head_entropy_equals_the_unfused_path(dtype, tol, temperature):
    """The fused entropy H = logsumexp(x) − Σ softmax(x)·x and its gradient (alone and mixed with the
    log-prob's) equal entropy_from_logits of the full logits."""
    from posttrain.logprobs import entropy_from_logits

    g = torch.Generator().manual_seed(2)
    h = torch.randn(29, 16, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(83, 16, dtype=dtype, generator=g, requires_grad=True)
    ids = torch.randint(0, 83, (29,), generator=g)
    lp, hits, ent = lm_head_logps(h, w, ids, chunk_size=8, temperature=temperature, return_hits=True,
                                  return_entropy=True)
    logits = h @ w.t()
    ent_b = entropy_from_logits(logits, temperature=temperature)
    torch.testing.assert_close(ent, ent_b, rtol=tol, atol=tol)
    assert torch.equal(hits, logits.argmax(-1) == ids)
    up, ue = torch.randn(29, dtype=lp.dtype, generator=g), torch.randn(29, dtype=lp.dtype, generator=g)
    lp_b = selective_log_softmax(logits, ids, temperature=temperature)
    for loss_a, loss_b in [((ent * ue).sum(), (ent_b * ue).sum()),
                           ((lp * up + ent * ue).sum(), (lp_b * up + ent_b * ue).sum())]:
        ga, gb = torch.autograd.grad(loss_a, (h, w), retain_graph=True), torch.autograd.grad(loss_b, (h, w),
                                                                                               retain_graph=True)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_lm_head_entropy_gradcheck():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([0, 3, 6, 1, 2])

    def f(h, w):
        lp, ent = lm_head_logps(h, w, ids, 2, temperature=1.3, return_entropy=True)
        return lp * 0.3 + ent

    assert torch.autograd.gradcheck(f, (h, w))


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_rl_loss_fused_equals_full_forward(tiny_model, monkeypatch, entropy_coef):
    """GRPO's loss, entropy metric and gradient with the fused head (no [tokens, vocab] logits) equal the
    full-logits path, with a sampling temperature and an entropy bonus on and off."""
    from posttrain.algorithms.grpo import GRPOConfig, make_loss
    from posttrain.models import forward
    from posttrain.rollouts.experience import Experience
    from posttrain.rollouts.online import pg_recipe

    cfg = GRPOConfig()
    cfg.loss.entropy_coef = entropy_coef
    cfg.rollout.temperature = 0.8
    recipe = pg_recipe(cfg)
    g = torch.Generator().manual_seed(4)
    comps = [[20, 21, 22, 2], [30, 2], [40, 41, 42, 43], [50, 51, 2]]
    T = 4
    exp = Experience(prompts=["p"] * 4, prompt_ids=[[1, 5, 9, 12]] * 2 + [[3, 4]] * 2, completion_ids=comps,
                     texts=[""] * 4, finish=["stop"] * 4, group_size=2, scores=torch.zeros(4),
                     valid=torch.ones(4, dtype=torch.bool), components={},
                     mask=torch.tensor([[1.0] * len(c) + [0.0] * (T - len(c)) for c in comps]),
                     rollout_logp=-torch.rand(4, T, generator=g), ref_logp=-torch.rand(4, T, generator=g))
    mb = exp.micro_batch([0, 1, 2, 3])
    mb["advantages"] = torch.randn(4, generator=g)[:, None].expand(4, T).contiguous()

    class Coef:  # β of the KL in the loss
        value = 0.1

    loss_fn, _ = make_loss(recipe, Coef())

    model64 = copy.deepcopy(tiny_model).double()

    def run(model):
        model.zero_grad()
        loss, metrics = loss_fn(model, mb, 1)
        loss.backward()
        return loss.detach(), float(metrics["entropy"]), [p.grad.double() for p in model.parameters()
                                                           if p.grad is not None]

    fused, fused64 = run(tiny_model), run(model64)
    monkeypatch.setattr(forward, "_HEAD_SLICE_ARCHS", ())
    full, full64 = run(tiny_model), run(model64)
    torch.testing.assert_close(fused[0], full[0], rtol=1e-6, atol=1e-6)
    assert fused[1] == pytest.approx(full[1], rel=1e-6) and fused[1] > 0

    def scaled_gap(a, b):  # largest difference of any gradient tensor, relative to that tensor's scale
        return max(float((x - y).abs().max()) / float(y.abs().max()) for x, y in zip(a, b))

    assert scaled_gap(fused64[2], full64[2]) < 1e-12  # the same math
    # fp32: each path is ~1.5e-6 (of each tensor's scale) from the fp64 gradient, and the fused one no
    # further than the full one; the two differ from each other by about that rounding
    assert scaled_gap(fused[2], fused64[2]) <= max(2e-6, 1.2 * scaled_gap(full[2], full64[2]))
    assert scaled_gap(fused[2], full[2]) <= 2e-6


def test_completion_logps_equal_separate_full_forwards(tiny_model):
    """Evaluation's summed completion log-probs (packed, head only at completion positions) equal a
    plain forward of each sequence alone."""
    from posttrain.models.forward import completion_logps

    prompts, comps = [[1, 5, 9], [3, 4, 5, 6], [7]], [[20, 21], [30, 31, 32, 33], [40]]
    got = completion_logps(tiny_model, prompts, comps, micro=2)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            lp = torch.log_softmax(tiny_model(ids).logits[0, :-1].double(), -1)
        want = lp[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].sum()
        assert float(got[i]) == pytest.approx(float(want), abs=1e-4)
