"""Supervised fine-tuning loss."""

from __future__ import annotations

import torch

from posttrain.masked import masked_sum

__all__ = ["nll_loss"]


def nll_loss(logp: torch.Tensor, mask: torch.Tensor,
             num_items: torch.Tensor | int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level negative log-likelihood (maximum likelihood / teacher forcing):

        L = −(1/N) Σ_{i,t} m_{i,t} log π_θ(x_{i,t} | x_{i,<t})

    N = ``num_items``, by default the number of trained tokens Σ m here. Pass the trained-token count
    of the whole optimizer step (all micro-batches, all processes) when accumulating gradients: then
    the k micro-batch losses Σ/N add up to exactly the full-batch loss, where averaging per
    micro-batch would over-weight tokens of short micro-batches.

    Shapes: logp [B, T] (from ``token_logps``), mask [B, T] (1 = trained token). Returns
    (loss scalar, {"nll": this batch's per-token NLL −Σ m log π / Σ m, detached}).
    """
    total = masked_sum(logp, mask)
    count = mask.bool().sum().to(logp.dtype)
    denom = count.clamp(min=1) if num_items is None else num_items
    loss = -total / denom
    return loss, {"nll": (-total / count.clamp(min=1)).detach()}
