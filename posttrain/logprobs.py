"""Token log-probabilities and entropies from logits without a full [B, T, V] log-softmax.

A language model's logits are [B, T, V] with V ≈ 32k–256k; ``log_softmax(logits)`` makes a second
tensor of that size (in fp32, a third once the gradient exists) only to read one entry per row.
Here rows are processed in tiles of about ``chunk_size`` rows: each tile is upcast to fp32 (bf16 has
8 mantissa bits, too few for a logsumexp over 10⁵ terms), reduced to its logsumexp, and dropped. The
backward pass recomputes the softmax tile by tile from the saved logits and logsumexp, so peak extra
memory is one fp32 tile, whatever B·T is.

Compute dtype: fp32, or fp64 when the logits are fp64 (so ``gradcheck`` can verify the gradient).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from posttrain.errors import ConfigError

__all__ = ["selective_log_softmax", "entropy_from_logits", "token_logps", "lm_head_logps"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


HEAD_BLOCK_ELEMENTS = 2**24  # one [rows, V] fp32 block of the fused head: 64 MiB, ~110 rows at V = 152k


def head_chunk_rows(vocab_size: int) -> int:
    """Rows per block of the fused LM head: a fixed memory budget (``HEAD_BLOCK_ELEMENTS``) rather than a
    fixed row count, so a 152k vocabulary holds 64 MiB per block, not 0.6 GB (the backward holds two)."""
    return max(16, min(4096, HEAD_BLOCK_ELEMENTS // max(1, vocab_size)))


def _as_3d(logits: torch.Tensor, name: str) -> torch.Tensor:
    # A view, never a copy: reshaping a sliced (non-contiguous) [B, T, V] would copy all of it.
    if logits.dim() == 3:
        return logits
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    raise ConfigError(f"{name}: logits must be [B, T, V] or [N, V], got shape {tuple(logits.shape)}")


def _tiles(b: int, t: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """(batch slice, time slice) tiles of about ``chunk_size`` rows that cover [b, t]."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    kt = max(1, min(t, chunk_size))
    kb = max(1, chunk_size // kt)
    for b0 in range(0, b, kb):
        for t0 in range(0, t, kt):
            yield slice(b0, b0 + kb), slice(t0, t0 + kt)


def _forward(logits: torch.Tensor, ids: torch.Tensor, chunk_size: int,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(ids) [B, T], logsumexp [B, T]) of logits / temperature, in the compute dtype, tile by tile."""
    dt = _compute_dtype(logits.dtype)
    b, t, _ = logits.shape
    out = torch.empty(b, t, dtype=dt, device=logits.device)
    lse = torch.empty(b, t, dtype=dt, device=logits.device)
    for bs, ts in _tiles(b, t, chunk_size):
        x = logits[bs, ts].to(dt)
        if temperature != 1.0:
            x = x / temperature
        z = torch.logsumexp(x, dim=-1)
        lse[bs, ts] = z
        out[bs, ts] = x.gather(-1, ids[bs, ts].unsqueeze(-1)).squeeze(-1) - z
    return out, lse


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log p(id) = x_id − logsumexp(x) with x = logits/τ; ∂/∂logits_v = (1[v = id] − softmax(x)_v)/τ,
    recomputed per tile."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, chunk_size: int, temperature: float) -> torch.Tensor:
        out, lse = _forward(logits, ids, chunk_size, temperature)
        # The logits are alive anyway (the model produced them); saving them costs no memory.
        ctx.save_for_backward(logits, ids, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, ids, lse = ctx.saved_tensors
        dt = lse.dtype
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        b, t, _ = logits.shape
        tau = ctx.temperature
        for bs, ts in _tiles(b, t, ctx.chunk_size):
            g_out = grad_out[bs, ts].to(dt).unsqueeze(-1)
            if tau != 1.0:
                g_out = g_out / tau  # chain rule through logits / τ
            # copy=True: the in-place ops below must not write into fp32 logits.
            g = logits[bs, ts].to(dt, copy=True)
            if tau != 1.0:
                g.div_(tau)
            g.sub_(lse[bs, ts].unsqueeze(-1)).exp_().mul_(-g_out)  # −softmax · grad
            g.scatter_add_(-1, ids[bs, ts].unsqueeze(-1), g_out)  # + grad at the taken token
            grad[bs, ts] = g.to(logits.dtype)
        return grad, None, None, None


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor, chunk_size: int | None = None, *,
                          temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / τ)[..., ids]: the log-probability of the given token at each position.

    log π(y_t | s_t) = z_{t, y_t}/τ − log Σ_v exp(z_{t, v}/τ)

    ``temperature`` τ is applied to each fp32 tile, so sampling-temperature log-probs need no
    full-size ``logits / τ`` (or ``logits.float()``) copy by the caller.

    Shapes: logits [B, T, V] (or [N, V]) in any float dtype; ids [B, T] (or [N]) integer, every
    entry a valid index (replace ignore indices such as −100 before calling). Returns [B, T] (or
    [N]) in fp32 (fp64 for fp64 logits). ``chunk_size`` is the number of rows per tile (None:
    ``head_chunk_rows(V)``, a 64 MiB fp32 tile).

    Memory: never more than one fp32 tile of [chunk_size, V] besides the inputs; the gradient
    w.r.t. the logits (which has the logits' size and dtype) is written tile by tile.
    """
    flat = logits.dim() == 2
    x = _as_3d(logits, "selective_log_softmax")
    chunk_size = head_chunk_rows(x.shape[-1]) if chunk_size is None else chunk_size
    idx = (ids.unsqueeze(0) if flat else ids).long()
    if idx.shape != x.shape[:-1]:
        raise ConfigError(f"selective_log_softmax: ids shape {tuple(ids.shape)} does not match logits "
                          f"{tuple(logits.shape)} without the vocabulary dimension")
    if torch.is_grad_enabled() and logits.requires_grad:
        out = _SelectiveLogSoftmax.apply(x, idx, chunk_size, float(temperature))
    else:
        out = _forward(x, idx, chunk_size, float(temperature))[0]
    return out.squeeze(0) if flat else out


def _entropy_tile(x: torch.Tensor, temperature: float) -> torch.Tensor:
    # H = −Σ p log p summed over log p (terms ≥ 0): logsumexp(x) − Σ p x would cancel in fp32.
    x = x.to(_compute_dtype(x.dtype))
    if temperature != 1.0:
        x = x / temperature
    logp = torch.log_softmax(x, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the next-token distribution softmax(z_t / τ) at each position.

    H(π(· | s_t)) = −Σ_v π(v | s_t) log π(v | s_t) = logsumexp(x_t) − Σ_v softmax(x_t)_v x_{t,v},  x = z/τ

    Shapes: logits [B, T, V] (or [N, V]); returns [B, T] (or [N]) in fp32 (fp64 for fp64 input).
    Differentiable: with grad enabled each tile is checkpointed, so the backward pass recomputes
    its softmax instead of keeping every tile's fp32 intermediates alive.
    """
    flat = logits.dim() == 2
    x = _as_3d(logits, "entropy_from_logits")
    chunk_size = head_chunk_rows(x.shape[-1]) if chunk_size is None else chunk_size
    grad = torch.is_grad_enabled() and logits.requires_grad
    b, t, _ = x.shape
    out = torch.empty(b, t, dtype=_compute_dtype(x.dtype), device=x.device)
    for bs, ts in _tiles(b, t, chunk_size):
        tile = x[bs, ts]
        tau = float(temperature)
        out[bs, ts] = checkpoint(_entropy_tile, tile, tau, use_reentrant=False) if grad else _entropy_tile(tile, tau)
    return out.squeeze(0) if flat else out


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, chunk_size: int | None = None, *,
                temperature: float = 1.0) -> torch.Tensor:
    """Causal-LM log-probs of each next token: out[:, t] = log π(input_ids[:, t+1] | input_ids[:, ≤t]).

    The causal shift: the logits at position t predict token t + 1, so the result pairs
    ``logits[:, :-1]`` with ``input_ids[:, 1:]``. Shapes: logits [B, T, V], input_ids [B, T];
    returns [B, T − 1] (fp32). A loss mask for the result is ``mask[:, 1:]`` (the mask of the
    predicted tokens).

    The ids are shifted, not the logits: slicing ``logits[:, :-1]`` would make autograd allocate a
    zero-filled [B, T, V] gradient for the slice's backward. The last position is computed against
    a dummy id 0 and dropped (1/T of wasted work, no extra memory); its gradient is exactly zero.
    ``temperature`` as in ``selective_log_softmax``.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ConfigError(f"token_logps: expected logits [B, T, V] and input_ids [B, T], got "
                          f"{tuple(logits.shape)} and {tuple(input_ids.shape)}")
    targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
    return selective_log_softmax(logits, targets, chunk_size, temperature=temperature)[:, :-1]


# ----------------------------------------------------------------------------- the LM head fused in


class _LMHeadLogps(torch.autograd.Function):
    """log p(id) (and optionally the entropy H) of logits = hidden @ Wᵀ (/τ), row chunk by row chunk:
    the [rows, V] logits exist one chunk at a time, in the forward and again in the backward
    (recomputed), never for all rows.

    With x = logits/τ, p = softmax(x), H = −Σ_v p_v log p_v and g the incoming gradients of log p(id)
    and of H:  ∂log p(id)/∂x = 1[v = id] − p,   ∂H/∂x = −p ⊙ (log p + H),
    G = ∂/∂x = g_lp·(1[v = id] − p) − g_H·p ⊙ (log p + H);   ∂/∂hidden = (G/τ) @ W,  ∂/∂W = (G/τ)ᵀ @ hidden.
    H is computed from max-shifted logits (terms ≥ 0), not as logsumexp(x) − E_p[x], which cancels in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, chunk_size: int, temperature: float, want_entropy: bool):
        dt = _compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=dt, device=hidden.device)
        lse = torch.empty(n, dtype=dt, device=hidden.device)
        hits = torch.empty(n, dtype=torch.bool, device=hidden.device)
        ent = torch.empty(n if want_entropy else 0, dtype=dt, device=hidden.device)
        for a in range(0, n, chunk_size):
            x = (hidden[a:a + chunk_size] @ weight.t()).to(dt)
            if temperature != 1.0:
                x = x / temperature
            # one exp pass over the block serves the logsumexp and the entropy: with m = max x, d = x − m ≤ 0,
            # e = exp d, s = Σe:  z = m + log s,  log p(id) = d_id − log s,  H = log s − Σ e·d / s
            # (two non-negative terms: no cancellation), and id is an arg-max exactly when d_id = 0
            m = x.amax(-1, keepdim=True)
            d = x.sub_(m)
            e = d.exp()
            s = e.sum(-1)
            log_s = s.log()
            d_id = d.gather(-1, ids[a:a + chunk_size, None]).squeeze(-1)
            lse[a:a + chunk_size] = m.squeeze(-1) + log_s
            out[a:a + chunk_size] = d_id - log_s
            hits[a:a + chunk_size] = d_id == 0
            if want_entropy:
                ent[a:a + chunk_size] = log_s - torch.linalg.vecdot(e, d) / s
        ctx.save_for_backward(hidden, weight, ids, lse, ent)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.mark_non_differentiable(hits)
        ctx.set_materialize_grads(False)  # an unused output (the entropy as a metric only) costs no backward work
        return out, hits, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_hits, grad_ent):
        hidden, weight, ids, lse, ent = ctx.saved_tensors
        tau, c = ctx.temperature, ctx.chunk_size
        dt = lse.dtype
        g_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        g_weight = torch.zeros(weight.shape, dtype=dt, device=weight.device) if ctx.needs_input_grad[1] else None
        for a in range(0, hidden.shape[0], c):
            h = hidden[a:a + c]
            x = (h @ weight.t()).to(dt)
            if tau != 1.0:
                x.div_(tau)
            logp = x.sub_(lse[a:a + c, None])
            g_lp = (grad_out[a:a + c].to(dt) if grad_out is not None else x.new_zeros(len(x)))[:, None] / tau
            if grad_ent is not None:  # −p ⊙ (g_lp + g_H (log p + H))
                p = logp.exp()
                logp.add_(ent[a:a + c, None]).mul_(grad_ent[a:a + c].to(dt)[:, None] / tau).add_(g_lp)
                g = p.mul_(logp).neg_()
            else:  # one [rows, V] block, not two: p overwrites log p
                g = logp.exp_().mul_(-g_lp)
            g.scatter_add_(-1, ids[a:a + c, None], g_lp)  # + g_lp at the taken token
            if g_hidden is not None:
                g_hidden[a:a + c] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if g_weight is not None:
                g_weight.addmm_(g.t(), h.to(dt))
        return g_hidden, None if g_weight is None else g_weight.to(weight.dtype), None, None, None, None


def lm_head_logps(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, chunk_size: int | None = None, *,
                  temperature: float = 1.0, return_hits: bool = False, return_entropy: bool = False):
    """log softmax(hidden @ Wᵀ / τ)[ids]: the LM head and the selective log-softmax fused, so the [N, V]
    logits (and their gradient) are never held for all N rows — one [chunk_size, V] fp32 block at a time
    (``chunk_size=None``: ``head_chunk_rows(V)``, a 64 MiB block).

    Shapes: hidden [N, H] (the final hidden states of the positions that predict), weight [V, H] (the
    output embedding, tied or not; no bias), ids [N]. Returns [N] in fp32 (fp64 for fp64 inputs), equal
    to ``selective_log_softmax(hidden @ weight.T, ids)``; the gradient flows to ``hidden`` and ``weight``.
    With a real vocabulary (V ≈ 152k) a packed batch of thousands of tokens otherwise holds gigabytes
    of logits: ``[tokens, V]`` in fp32 is 0.6 MB per token. ``return_hits``: also [N] bool, whether
    ``ids`` is the arg-max of each row (token accuracy, free in the same pass). ``return_entropy``: also
    [N] H(softmax(x)) = logsumexp(x) − Σ_v softmax(x)_v x_v, x = hidden @ Wᵀ/τ, differentiable (its
    gradient is computed only when a loss uses it), equal to ``entropy_from_logits(hidden @ weight.T)``.
    Results come in the order (log-probs, hits, entropy), each extra one only when asked for."""
    if hidden.dim() != 2 or ids.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ConfigError(f"lm_head_logps: expected hidden [N, H], weight [V, H], ids [N], got "
                          f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(ids.shape)}")
    chunk_size = head_chunk_rows(weight.shape[0]) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    out, hits, ent = _LMHeadLogps.apply(hidden, weight, ids.long(), chunk_size, float(temperature), return_entropy)
    if not (return_hits or return_entropy):
        return out
    return (out,) + ((hits,) if return_hits else ()) + ((ent,) if return_entropy else ())
