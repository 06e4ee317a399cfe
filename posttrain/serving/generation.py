"""Generation for ``posttrain serve``: the one function the HTTP layer calls to sample (the project's
rollout engine, then teacher-forced log-probs of the model's own next-token distribution), and the
helpers that cut completions at stop strings and stop tokens. A different decoding backend can be
swapped in here without touching the HTTP layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from posttrain.engines.rollout import HFRolloutEngine, SamplingParams, filter_logits
from posttrain.models.forward import separable_head
from posttrain.models.loading import eval_mode


@dataclass
class Generated:
    """One sampled continuation; stop tokens are not included in ``token_ids``. ``logprobs`` is
    empty unless asked for; ``top_logprobs[t]`` holds the k best (token id, log-prob) at step t
    (empty lists when k = 0)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: Literal["stop", "length"]


def _generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
              temperature: float = 1.0, top_p: float = 1.0, n: int = 1, seed: int | None = None,
              logprobs: bool = False, top_logprobs: int = 0, stop_token_ids: list[int] | None = None,
              stop_strings: Sequence[str] = (), engine=None) -> list[Generated]:
    """``n`` continuations per prompt (prompt-major order), sampled by the project's rollout engine.

    The single swap point between token ids and a decoding backend. ``temperature == 0`` decodes
    greedily. When ``logprobs`` or ``top_logprobs`` is asked for, they come from one teacher-forced
    forward pass over prompt + completion: the model's own ``log_softmax(logits)``, whatever the
    sampling temperature or top-p (the engine's own log-probs describe the tempered distribution).
    Pass a cached ``engine`` (an ``HFRolloutEngine`` over ``model``) to avoid rebuilding it per call.
    """
    pad = _pad_id(tokenizer)
    engine = engine or _engine(model, tokenizer)
    stops = list(stop_token_ids or [tokenizer.eos_token_id])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=0, stop_token_ids=stops, stop_strings=list(stop_strings),
                            seed=seed, n=n)
    rollouts = engine.generate([list(p) for p in prompts], params)
    out = []
    for r in rollouts:
        ids = r.completion_ids[:-1] if r.finish_reason == "stop" else list(r.completion_ids)
        out.append(Generated(ids, [], [[] for _ in ids], "length" if r.finish_reason == "length" else "stop"))
    if logprobs or top_logprobs:
        scored = teacher_forced_logprobs(model, pad, [(r.prompt_ids, g.token_ids) for r, g in zip(rollouts, out)],
                                         top_logprobs)
        for g, (lp, top) in zip(out, scored):
            g.logprobs, g.top_logprobs = lp, top
    return out


def teacher_forced_logprobs(model, pad_token_id: int, rows: list[tuple[list[int], list[int]]],
                            top_k: int = 0, processed: SamplingParams | None = None,
                            ) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
    """For each (prompt, continuation): log p(c_t | prompt, c_<t) for every continuation token, and
    the ``top_k`` most likely (token, log-prob) at each of those positions. One right-padded forward
    pass (padding after the last real token cannot change causal logits before it); for Llama/Qwen-style
    models the LM head runs only at each continuation's positions, one sequence at a time, so no
    [batch, length, vocab] logits exist (``models.forward.separable_head``). ``processed``:
    the log-probs of the distribution these sampling parameters draw from (temperature, top-k, top-p;
    the rollout engine's semantics) instead of the model's own ``log_softmax(logits)``."""
    import torch

    seqs = [list(p) + list(c) for p, c in rows]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    base, head = separable_head(model)
    with eval_mode(model), torch.no_grad():
        if head is not None:  # the head at continuation positions only, one sequence at a time
            hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            logits_at = lambda i, a, b: head(hidden[i, a:b])  # noqa: E731
        else:
            full = model(input_ids=ids, attention_mask=mask).logits
            logits_at = lambda i, a, b: full[i, a:b]  # noqa: E731
        out = []
        for i, (p, c) in enumerate(rows):
            out.append(_scored(logits_at(i, len(p) - 1, len(p) - 1 + len(c)).float(), c, top_k, processed)
                       if c else ([], []))
    return out


def _scored(rows_logits, c: list[int], top_k: int, processed: SamplingParams | None):
    """(log-prob of each continuation token, its top-k alternatives) from the [len(c), V] logits that
    predict them."""
    import torch

    if processed is not None and processed.temperature > 0:
        rows_logits = filter_logits(rows_logits / processed.temperature, processed.top_k, processed.top_p)
    logp = torch.log_softmax(rows_logits, dim=-1)
    chosen = logp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1).tolist()
    if not top_k:
        return chosen, [[] for _ in c]
    values, indices = logp.topk(top_k, dim=-1)
    return chosen, [list(zip(ix, vs)) for ix, vs in zip(indices.tolist(), values.tolist())]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any EOS ids the checkpoint's generation config lists."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def cut_at_stop(tokenizer, token_ids: list[int], stops: list[str]) -> tuple[str, int, bool]:
    """Decode and cut the text before the first stop string, as OpenAI does (the stop string is
    not returned). Returns (text, tokens kept, hit); kept tokens are those whose text lies wholly
    before the cut, so their log-probs describe exactly the returned text or a prefix of it."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return text, len(token_ids), False
    cut = min(hits)
    keep = 0
    for k in range(1, len(token_ids) + 1):
        if len(tokenizer.decode(token_ids[:k], skip_special_tokens=True)) > cut:
            break
        keep = k
    return text[:cut], keep, True


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _engine(model, tokenizer):
    return HFRolloutEngine(model, pad_token_id=_pad_id(tokenizer), tokenizer=tokenizer)
