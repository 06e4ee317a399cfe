"""Reductions over the valid positions of a padded tensor.

A ``mask`` is read as boolean (any non-zero entry is valid) and broadcasts against ``x``. Masked
entries are *selected away* with ``torch.where``, never multiplied by 0, so a ``-inf`` or ``nan``
at a padding position (a log-prob of a pad token, say) cannot leak into a sum or its gradient.
No function here synchronises with the host.
"""

from __future__ import annotations

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]


def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.broadcast_to(mask.bool(), x.shape)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Σ_{valid} x over ``dim`` (all dimensions when None).

    Shapes: x [...], mask broadcastable to x; returns x reduced over ``dim``.
    """
    valid = _valid(x, mask)
    kept = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def _count(x: torch.Tensor, mask: torch.Tensor, dim) -> torch.Tensor:
    valid = _valid(x, mask)
    n = valid.sum() if dim is None else valid.sum(dim)
    return n.to(x.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None,
                eps: float = 0.0) -> torch.Tensor:
    """Σ_{valid} x / (n_valid + eps) over ``dim``.

    With eps = 0 an all-masked slice gives nan (0/0), as ``torch.mean`` of an empty tensor does;
    pass eps > 0 (or clamp the count yourself) where an empty slice is expected.
    """
    return masked_sum(x, mask, dim) / (_count(x, mask, dim) + eps)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of ``x`` (a scalar over all of them).

    Var = Σ_{valid} (x − μ)² / (n − 1) with Bessel's correction (``unbiased=True``, torch's default),
    or / n. Fewer than two valid entries with ``unbiased=True`` gives nan, as ``torch.var`` does.
    """
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    n = _count(x, mask, None)
    return sq / (n - 1) if unbiased else sq / n


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ) / √(Var + eps) over the valid entries; masked positions are returned as 0.

    μ and the (unbiased) variance are taken over all valid entries of the batch. With
    ``shift_mean=False`` the mean is added back, so only the scale changes (used for rewards, whose
    sign carries meaning). Shapes: x [...], mask broadcastable to x; returns x's shape.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(_valid(x, mask), white, torch.zeros((), dtype=white.dtype, device=white.device))
