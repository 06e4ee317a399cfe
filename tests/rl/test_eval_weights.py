"""Held-out evaluation during online RL samples from the policy's current weights: the rollout engine
keeps fused and cast copies of the weights (refreshed by update_weights), so an evaluation after an
optimizer step must refresh them first, or it would report the policy of one step earlier."""

import torch


def test_online_evaluation_uses_the_weights_after_the_last_update(tiny_path, tmp_path):
    from posttrain.algorithms.grpo import GRPOConfig
    from posttrain.models.loading import load_policy
    from posttrain.rollouts.experience import make_engine
    from posttrain.rollouts.online import online_setup
    from posttrain.rollouts.task_eval import task_eval

    cfg = GRPOConfig()
    cfg.model.name_or_path = tiny_path
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.max_steps, cfg.train.progress, cfg.kl.beta = 1, False, 0.0
    cfg.task_eval_prompts, cfg.task_eval_samples = 16, 2
    o = online_setup(cfg, "grpo", lambda tokenizer: load_policy(cfg.model, cfg.lora))
    policy = o.engine.unwrapped
    with torch.no_grad():  # an optimizer step changes the parameters in place, as AdamW does
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    fresh = make_engine(policy, o.tokenizer, cfg.rollout)  # built now: reads the current weights
    want = task_eval(policy, o.tokenizer, fresh, cfg.rollout.prompts, cfg.task_eval_prompts, cfg.task_eval_samples,
                     cfg.train.seed, max_new_tokens=cfg.rollout.max_new_tokens)
    assert want != o.summary["initial"]  # the perturbation changed what the policy samples
    assert o.evaluate() == want
