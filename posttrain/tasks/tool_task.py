"""The built-in multi-turn task: add a list of digits, with or without a calculator tool.

    user:       Add the numbers 7 5 9 8 6.
    assistant:  <tool_call>{"arguments": {"expr": "7+5+9+8+6"}, "name": "calc"}</tool_call>
    tool:       35
    assistant:  35

Adding five or six digits in one shot is hard for a model of a few million parameters; copying them
into an expression and copying the tool's answer back is easy. So tool use measurably helps, and the
same problems without the tool are the baseline. Both SFT sets come from noisy demonstrators (right
~60% of the time): with the tool, the expression sometimes drops a number or the answer is copied
off by one; without it, the sum is off by one to three. The reward is 1 for the exact sum.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MIN_LEN, MAX_LEN = 4, 6
TOOL = "calc"  # the calculator: calc(expr) evaluates arithmetic
DEMO_MIX = (0.60, 0.25, 0.15)  # with the tool: ideal, a number dropped from the expression, answer off by one


@dataclass(frozen=True)
class SumProblem:
    numbers: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return f"Add the numbers {' '.join(map(str, self.numbers))}."

    @property
    def answer(self) -> str:
        return str(sum(self.numbers))


def score(row: dict, text: str) -> float:
    """1 when the final answer is exactly the sum, else 0."""
    return float(text.strip() == str(row["answer"]))


def _problems(n: int, seed: int, exclude: set | None = None) -> list[SumProblem]:
    rng, out = random.Random(seed), []
    while len(out) < n:
        p = SumProblem(tuple(rng.randrange(10) for _ in range(rng.randint(MIN_LEN, MAX_LEN))))
        if not exclude or p not in exclude:
            out.append(p)
    return out


def heldout(n: int = 256) -> list[SumProblem]:
    return _problems(n, 54321)


def train_problems(n: int, seed: int) -> list[SumProblem]:
    return _problems(n, seed, set(heldout(512)))


def tool_call(expr: str) -> dict:
    return {"type": "function", "function": {"name": TOOL, "arguments": {"expr": expr}}}


def demo_with_tool(p: SumProblem, rng: random.Random) -> list[dict]:
    nums = list(p.numbers)
    kind = rng.choices(["ideal", "drop", "off"], weights=DEMO_MIX)[0]
    if kind == "drop":
        nums.pop(rng.randrange(len(nums)))
    result = sum(nums)
    final = result + rng.choice([-1, 1]) if kind == "off" else result
    return [{"role": "user", "content": p.prompt},
            {"role": "assistant", "content": "", "tool_calls": [tool_call("+".join(map(str, nums)))]},
            {"role": "tool", "content": str(result)},
            {"role": "assistant", "content": str(final)}]


def demo_without_tool(p: SumProblem, rng: random.Random) -> list[dict]:
    total = sum(p.numbers)
    if rng.random() >= DEMO_MIX[0]:
        total += rng.choice([-3, -2, -1, 1, 2, 3])
    return [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": str(total)}]


def sft_records(n: int = 2000, seed: int = 0, tools: bool = True) -> list[dict]:
    """SFT conversations (``messages``); the tool is learned from the demonstrations (no schema block, which
    would triple a tiny model's prompt)."""
    rng = random.Random(seed + 3)
    demo = demo_with_tool if tools else demo_without_tool
    return [{"messages": demo(p, rng)} for p in train_problems(n, seed)]


def prompt_records(n: int = 1000, seed: int = 1, held: bool = False) -> list[dict]:
    probs = heldout(n) if held else train_problems(n, seed)
    return [{"prompt": p.prompt, "answer": p.answer} for p in probs]
