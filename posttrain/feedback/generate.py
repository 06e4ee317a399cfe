"""``posttrain label generate``: sample K candidate responses per prompt with transformers, written in
the labeling app's import format. Deliberately small (plain ``model.generate``); the project's
rollout engine can replace it for speed."""

from __future__ import annotations

from typing import Any

from posttrain.data.chat import ensure_template
from posttrain.models.tiny import resolve


def _load(model_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer


    path = resolve(model_path)  # 'tiny' builds the offline test model; other values pass through
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_template(tokenizer)  # a base model without a chat template gets the project default
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches must end at the same position
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, tokenizer


def sample_candidates(model_path: str, prompts: list[Any], *, k: int = 2, max_new_tokens: int = 128,
                      temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
                      model_name: str | None = None) -> list[dict]:
    """One ``{"prompt", "responses": [{"text", "model"}, ...]}`` record per prompt (k samples each)."""
    import torch

    model, tokenizer = _load(model_path)
    torch.manual_seed(seed)
    name = model_name or model_path
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        convs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in batch]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, num_return_sequences=k, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, pad_token_id=tokenizer.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]  # rows are prompt-major: k samples per prompt
        decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, prompt in enumerate(batch):
            samples = decoded[i * k:(i + 1) * k]
            out.append({"prompt": prompt, "responses": [{"text": s.strip(), "model": name} for s in samples]})
    return out
