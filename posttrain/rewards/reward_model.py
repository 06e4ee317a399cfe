"""A reward callable backed by a trained reward model (``posttrain reward``'s ``final/``, or any HF
``*ForSequenceClassification`` with one label).

    scorer = RewardModelScorer("runs/reward/final")
    scorer.score(["Sort the numbers 3 1 2."], ["1 2 3"])      # -> [1.73]
    scorer(prompts, completions, **columns)                  # the reward-function contract

Prompts and responses are tokenized exactly as in training (the tokenizer's chat template; the
response ends with its end-of-turn token) and scored in packed batches: many short sequences share
one row, each attending to itself only (``data.batching``), so no compute is spent on padding, and
the score of a sequence does not depend on what it was batched with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.config import ModelConfig
from posttrain.data.batching import collate
from posttrain.data.chat import Example, encode_response
from posttrain.models.heads import load_reward_model, sequence_rewards
from posttrain.models.loading import eval_mode, load_tokenizer


class RewardModelScorer:
    """Scores (prompt, response) pairs with a scalar-head reward model.

    ``model``: a path / hub id, or an already loaded sequence-classification model
    (then pass ``tokenizer``). ``max_length`` truncates like training (prompt from the left first).
    ``batch_tokens`` bounds the tokens of one forward pass. A model given by path must hold a trained
    scalar head (a causal LM's would be random): else :class:`~posttrain.errors.ModelError`, naming
    ``where`` (the config key that gave the path)."""

    def __init__(self, model, tokenizer=None, *, max_length: int = 1024, batch_tokens: int = 8192,
                 dtype: str = "float32", packing: bool = True, device: str | None = None,
                 where: str | None = None):
        if isinstance(model, (str, Path)):
            tokenizer = tokenizer or load_tokenizer(str(model))
            model = load_reward_model(ModelConfig(name_or_path=str(model), dtype=dtype),
                                      pad_token_id=tokenizer.pad_token_id, require_trained_head=True,
                                      where=where)
        if tokenizer is None:
            raise ValueError("pass the tokenizer when giving a loaded model")
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_tokens, self.packing = max_length, batch_tokens, packing
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id  # collate pads with it; the head skips it (HF rule)
        self.__name__ = "reward_model"  # reward functions are named in logs

    # ------------------------------------------------------------------ encoding
    def encode(self, prompt, response):
        p, r = encode_response(self.tokenizer, prompt, response)
        over = len(p) + len(r) - self.max_length
        if over > 0:
            cut = min(over, max(len(p) - 1, 0))
            p = p[cut:]
            r = r[: self.max_length - len(p)]
        return Example(p + r, [0] * len(p) + [1] * len(r))

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_examples(self, examples: list) -> torch.Tensor:
        """[N] rewards of tokenized examples (``chat.Example``), in the given order."""
        if not examples:
            return torch.zeros(0)
        with eval_mode(self.model):
            order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
            out = torch.empty(len(examples))
            start = 0
            while start < len(order):
                # greedy token budget: longest first, so each batch holds similar lengths
                end, tokens = start, 0
                while end < len(order) and (end == start or tokens + len(examples[order[end]]) <= self.batch_tokens):
                    tokens += len(examples[order[end]])
                    end += 1
                idx = order[start:end]
                batch = collate([examples[i] for i in idx], packing=self.packing, pad_id=self.pad_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out[idx] = sequence_rewards(self.model, batch, self.pad_id).float().cpu()
                start = end
        return out

    def score(self, prompts: list, responses: list) -> list[float]:
        """One reward per (prompt, response); prompts/responses are strings or message lists."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_examples([self.encode(p, r) for p, r in zip(prompts, responses)]).tolist()

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        return self.score(prompts, completions)
