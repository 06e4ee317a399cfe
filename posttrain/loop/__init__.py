"""The closed loop: people and judges label what the policy samples, the reward model and the policy
are retrained, round after round, with the lineage of every model (``posttrain loop``; docs/loop.md)."""
