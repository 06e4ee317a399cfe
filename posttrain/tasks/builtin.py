"""The built-in task: list manipulation with a noisy demonstrator and a hidden gold reward.

A prompt asks to sort or reverse a short list of digits::

    user:      Sort the numbers 3 9 1 4.
    assistant: 1 3 4 9

Why this task: a model of a few million parameters learns the format in a minute or two on a CPU,
every response has a verifiable answer (RLVR), and a hidden *gold* reward grades responses on a
continuous scale (reward models, PPO, DPO). The SFT demonstrations come from a noisy demonstrator
that is right ~60% of the time and otherwise pads the answer with filler, swaps two neighbours or
drops a number; an SFT model imitates that noise, so it stays measurably imperfect, and every
preference or RL stage has something real to fix. Length does not predict quality (filler makes a
response longer and worse, a dropped number shorter and worse), so a "longer wins" baseline is
near or below chance while a learned reward model can beat it. See docs/builtin_task.md.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

OPS = {"sort": "Sort", "reverse": "Reverse"}
FILLERS = ["Sure! The answer is", "Okay, here it is:", "Let me think. It is"]
FILLER_PENALTY = 0.3  # gold cost of padding a correct answer with chatter
MIN_LEN, MAX_LEN = 3, 6

# demonstrator mix (ideal, filler, swap, drop): the SFT data's noise
DEMO_MIX = (0.60, 0.15, 0.15, 0.10)


@dataclass(frozen=True)
class Problem:
    op: str
    numbers: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return f"{OPS[self.op]} the numbers {' '.join(map(str, self.numbers))}."

    @property
    def answer(self) -> str:
        return " ".join(map(str, solve(self.op, self.numbers)))


def solve(op: str, numbers: tuple[int, ...] | list[int]) -> list[int]:
    return sorted(numbers) if op == "sort" else list(reversed(numbers))


_PROMPT_RE = re.compile(r"(Sort|Reverse) the numbers ((?:\d ?)+)\.")


def parse_prompt(prompt: str) -> Problem | None:
    """Recover the problem from a prompt string (or the last user turn of a conversation)."""
    m = _PROMPT_RE.search(prompt)
    if not m:
        return None
    op = "sort" if m.group(1) == "Sort" else "reverse"
    return Problem(op, tuple(int(d) for d in m.group(2).split()))


def extract_numbers(response: str) -> list[int]:
    """Digits the response states, in order (filler words are ignored)."""
    return [int(t) for t in re.findall(r"(?<!\S)\d(?!\S)", response)]


def is_correct(prompt: str, response: str) -> bool:
    """The verifiable reward: the stated numbers are exactly the solution (filler allowed)."""
    p = parse_prompt(prompt)
    return p is not None and extract_numbers(response) == solve(p.op, p.numbers)


def gold_reward(prompt: str, response: str) -> float:
    """Hidden gold reward in [-0.3, 1]: positional accuracy minus a penalty for filler words.

    accuracy = #positions where the stated number equals the solution / max(len(solution), len(stated));
    filler   = the response contains anything besides the digits.
    """
    p = parse_prompt(prompt)
    if p is None:
        return 0.0
    target = solve(p.op, p.numbers)
    stated = extract_numbers(response)
    hits = sum(a == b for a, b in zip(stated, target))
    accuracy = hits / max(len(target), len(stated), 1)
    filler = bool(re.sub(r"[\d\s]", "", response))
    return accuracy - FILLER_PENALTY * filler


# ----------------------------------------------------------------------------- generation


def sample_problem(rng: random.Random) -> Problem:
    n = rng.randint(MIN_LEN, MAX_LEN)
    return Problem(rng.choice(list(OPS)), tuple(rng.randrange(10) for _ in range(n)))


def demonstrate(problem: Problem, rng: random.Random) -> str:
    """One response of the noisy demonstrator."""
    target = solve(problem.op, problem.numbers)
    kind = rng.choices(["ideal", "filler", "swap", "drop"], weights=DEMO_MIX)[0]
    if kind == "filler":
        return f"{rng.choice(FILLERS)} {' '.join(map(str, target))}"
    if kind == "swap":
        pairs = [i for i in range(len(target) - 1) if target[i] != target[i + 1]]
        if pairs:
            i = rng.choice(pairs)
            target[i], target[i + 1] = target[i + 1], target[i]
    elif kind == "drop":
        target.pop(rng.randrange(len(target)))
    return " ".join(map(str, target))


def heldout_problems(n: int, seed: int = 12345) -> list[Problem]:
    """Held-out prompts: drawn from a separate seed and never in the training splits."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        p = sample_problem(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _train_problems(n: int, seed: int) -> list[Problem]:
    held = set(heldout_problems(512))
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        p = sample_problem(rng)
        if p not in held:
            out.append(p)
    return out


def sft_records(n: int = 4000, seed: int = 0) -> list[dict]:
    """SFT data in the prompt/completion format, from the noisy demonstrator."""
    rng = random.Random(seed + 1)
    return [{"prompt": p.prompt, "completion": demonstrate(p, rng)} for p in _train_problems(n, seed)]


def eval_records(n: int = 128) -> list[dict]:
    """Held-out SFT-format records with *ideal* answers (for eval loss / token accuracy)."""
    return [{"prompt": p.prompt, "completion": p.answer} for p in heldout_problems(n)]


def prompt_records(n: int = 1000, seed: int = 1, heldout: bool = False) -> list[dict]:
    """Prompt-only records with the verifiable answer column (RL)."""
    probs = heldout_problems(n) if heldout else _train_problems(n, seed)
    return [{"prompt": p.prompt, "answer": p.answer} for p in probs]


def gold_preference_records(n: int = 2000, seed: int = 2) -> list[dict]:
    """Preference pairs from demonstrator samples labeled by the gold reward (ties skipped)."""
    rng = random.Random(seed + 7)
    out = []
    for p in _train_problems(4 * n, seed):
        a, b = demonstrate(p, rng), demonstrate(p, rng)
        ga, gb = gold_reward(p.prompt, a), gold_reward(p.prompt, b)
        if ga == gb:
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        out.append({"prompt": p.prompt, "chosen": chosen, "rejected": rejected})
        if len(out) == n:
            break
    return out


def corpus(n: int = 2000) -> list[str]:
    """Text the offline tokenizer is trained on: prompts, answers and fillers."""
    rng = random.Random(99)
    texts = []
    for _ in range(n):
        p = sample_problem(rng)
        texts += [f"user\n{p.prompt}", f"assistant\n{demonstrate(p, rng)}"]
    return texts + FILLERS + ["system\n"] * 50


def _tool():
    from posttrain.tasks import tool_task  # the multi-turn task (docs/builtin_task.md)

    return tool_task


BUILTIN_SOURCES = {
    "tool_sft": lambda: _tool().sft_records(tools=True),
    "tool_sft_notools": lambda: _tool().sft_records(tools=False),
    "tool_prompts": lambda: _tool().prompt_records(),
    "tool_eval_prompts": lambda: _tool().prompt_records(256, held=True),
    "sft": lambda: sft_records(),
    "eval": lambda: eval_records(),
    "prompts": lambda: prompt_records(),
    "eval_prompts": lambda: prompt_records(256, heldout=True),
    "preferences": lambda: gold_preference_records(),
}
