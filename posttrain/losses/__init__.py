"""Loss functions: pure tensor in, ``(loss, metrics)`` out. One module per family."""

from posttrain.losses.direct import (
    DIRECT_LOSSES,
    cdpo_loss,
    dpo_loss,
    get_direct_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from posttrain.losses.policy import (
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    cispo_loss,
    explained_variance,
    get_policy_loss,
    gspo_loss,
    kl_penalty_in_loss,
    ppo_clip_loss,
    value_loss,
)
from posttrain.losses.reward import (
    bradley_terry_loss,
    kwise_pairwise_loss,
    plackett_luce_loss,
    reward_centering_loss,
)
from posttrain.losses.sft import nll_loss

__all__ = [
    "AGGREGATIONS", "DIRECT_LOSSES", "POLICY_LOSSES",
    "aggregate", "bradley_terry_loss", "cdpo_loss", "cispo_loss", "dpo_loss", "explained_variance",
    "get_direct_loss", "get_policy_loss", "gspo_loss", "hinge_loss", "ipo_loss", "kl_penalty_in_loss",
    "kto_loss", "kwise_pairwise_loss", "nll_loss", "orpo_loss", "plackett_luce_loss", "ppo_clip_loss",
    "reward_centering_loss", "robust_dpo_loss", "simpo_loss", "value_loss",
]
