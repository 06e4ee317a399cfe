"""Direct-alignment objectives over a packed preference batch: the DPO-family loss closure (sequence
log-probs of chosen and rejected, the cached or live reference, a loss from
``posttrain.losses.direct``), its hyper-parameters checked once, and held-out pair metrics. Used by
``dpo`` and, for its held-out pairs, ``kto``.
"""

from __future__ import annotations

import difflib
import inspect

import torch

from posttrain.data.preference import by_slot
from posttrain.errors import ConfigError
from posttrain.losses.direct import DIRECT_LOSSES, get_direct_loss, needs_reference
from posttrain.models.forward import sequence_logps
from posttrain.models.loading import eval_mode

REFERENCE_FREE = tuple(name for name, fn in DIRECT_LOSSES.items() if not needs_reference(fn))  # from the registry


_STANDARD = {"chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta",
             "chosen_lengths", "rejected_lengths"}


def loss_hparams(fn) -> dict[str, object]:
    """Keyword hyper-parameters a direct loss accepts beyond the standard inputs (name -> default)."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if k not in _STANDARD and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_reference(reference: str, loss: str) -> None:
    if reference in ("precompute", "live") and loss in REFERENCE_FREE:
        raise ConfigError(f"loss={loss} uses no reference model, but reference={reference}", where="reference",
                          fix="set reference=auto (or none)")
    if reference == "none" and loss not in REFERENCE_FREE:
        raise ConfigError(f"loss={loss} needs reference log-probs, but reference=none", where="reference",
                          fix=f"set reference=auto (precompute) or live; reference-free losses: {REFERENCE_FREE}")


def validate_direct(loss: str, beta: float, loss_args: dict, reference: str) -> None:
    if loss not in DIRECT_LOSSES:
        near = difflib.get_close_matches(loss, list(DIRECT_LOSSES), n=1)
        raise ConfigError(f"unknown loss '{loss}'", where="loss",
                          fix=(f"did you mean '{near[0]}'? " if near else "") +
                              f"valid losses: {', '.join(DIRECT_LOSSES)}")
    if beta <= 0:
        raise ConfigError(f"beta must be positive, got {beta}", where="beta", fix="use e.g. beta=0.1")
    accepted = loss_hparams(get_direct_loss(loss))
    for k in loss_args:
        if k not in accepted:
            raise ConfigError(f"loss={loss} takes no hyper-parameter '{k}'", where=f"loss_args.{k}",
                              fix=f"{loss} accepts: {', '.join(accepted) or 'none besides beta'}")
    check_reference(reference, loss)


def resolve_reference(reference: str, loss: str) -> str:
    return ("none" if loss in REFERENCE_FREE else "precompute") if reference == "auto" else reference


def make_loss_fn(loss: str, beta: float, loss_args: dict, live=None, nll_weight: float = 0.0):
    """(model, batch, total) -> (sum/total loss, metrics): the registry's loss on one packed forward,
    plus ``nll_weight`` x mean over pairs of −log π(y_c|x) / |y_c| (RPO) when set."""
    fn = get_direct_loss(loss)

    def loss_fn(model, batch, total):
        logp, ntok = sequence_logps(model, batch)  # chosen and rejected in one forward
        pol, lens = by_slot(logp, batch), by_slot(ntok, batch)
        ref = by_slot(live.batch_logps(batch, model), batch) if live is not None else batch.get("ref")
        ref_c, ref_r = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
        out, metrics = fn(pol[:, 0], pol[:, 1], ref_c, ref_r, beta=beta, chosen_lengths=lens[:, 0],
                          rejected_lengths=lens[:, 1], **loss_args)
        metrics = {k: v.detach() for k, v in metrics.items()}
        if nll_weight:
            nll = (-pol[:, 0] / lens[:, 0].clamp(min=1)).mean()
            metrics["nll"] = nll.detach()
            out = out + nll_weight * nll
        metrics["loss"] = out.detach()
        with torch.no_grad():
            metrics["logps/accuracy"] = (pol[:, 0] > pol[:, 1]).float().mean()
        n = batch["n_records"]
        return out * (n / total), metrics  # batch mean -> this micro-batch's share of sum/total

    return loss_fn


@torch.no_grad()
def pair_eval(model, batches: list[dict], loss_fn, autocast) -> dict[str, float]:
    """Held-out pairs: loss and metrics weighted by pairs (implicit-reward accuracy rewards/accuracy,
    margin, chosen/rejected rewards and log-probs; logps/accuracy = share with log π(y_c) > log π(y_r))."""
    if not batches:
        return {}
    with eval_mode(model):
        total = sum(b["n_records"] for b in batches).float()
        sums: dict[str, float] = {}
        for b in batches:
            with autocast():
                _, m = loss_fn(model, b, total)
            w = float(b["n_records"]) / float(total)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * w
    return sums
