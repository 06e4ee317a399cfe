"""String verifiers: exact match on an extracted answer, regex, format tags, length penalty.

Every reward here follows the reward-function contract::

    reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` are the dataset's extra columns, as lists aligned with ``prompts``. ``None`` means
"no reward for this sample" (the algorithm skips it). Each reward has a ``.name`` used in metric
names (``reward/<name>``). This module also holds the small helpers the other reward modules share.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from posttrain.errors import ConfigError, DataError

RewardFn = Callable[..., list]  # f(prompts, completions, **columns) -> list[float | None]


# ---------------------------------------------------------------------------- shared helpers
def reward_name(fn: Any) -> str:
    """The name a reward is logged under: its ``.name``, else ``__name__``, else its class name.

    >>> reward_name(exact_match())
    'exact_match'
    >>> def my_reward(prompts, completions, **columns): return [0.0] * len(prompts)
    >>> reward_name(my_reward)
    'my_reward'
    """
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


def outcome_metrics(fn: Any, prefix: str = "reward/") -> dict[str, float]:
    """Turn a reward's ``last_stats`` outcome counts into fractions for logging.

    >>> class R:
    ...     name, last_stats = "math", {"correct": 3, "unparseable": 1}
    >>> outcome_metrics(R())
    {'reward/math_correct_frac': 0.75, 'reward/math_unparseable_frac': 0.25}
    """
    stats = getattr(fn, "last_stats", None) or {}
    total = sum(stats.values())
    name = reward_name(fn)
    return {f"{prefix}{name}_{k}_frac": (v / total if total else 0.0) for k, v in stats.items()}


def check_batch(prompts: Sequence, completions: Sequence, name: str) -> None:
    """Prompts and completions must align one to one."""
    if len(prompts) != len(completions):
        raise DataError(f"reward {name!r} got {len(prompts)} prompts but {len(completions)} completions",
                        fix="pass one completion per prompt (repeat a prompt for each of its samples)")


def get_column(columns: dict[str, Any], column: str, n: int, name: str) -> list:
    """The dataset column ``column`` for a batch of ``n``, with an error naming what is there."""
    if column not in columns:
        have = ", ".join(sorted(columns)) or "none"
        raise DataError(f"reward {name!r} needs the dataset column {column!r}; the batch has columns: {have}",
                        fix=f"add a {column!r} column to the prompt dataset, or pass {name}'s column argument "
                            "to name the column that holds it")
    values = list(columns[column])
    if len(values) != n:
        raise DataError(f"column {column!r} has {len(values)} values for {n} completions",
                        where=f"reward {name!r}", fix="pass extra columns aligned with the prompts")
    return values


# ---------------------------------------------------------------------------- answer extraction
def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), matching nested braces."""
    starts = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not starts:
        return None
    i = starts[-1].end()
    rest = text[i:]
    if not rest.lstrip().startswith("{"):
        m = re.match(r"\s+([^\s$]+)", rest)  # the brace-less form: "\boxed 5"
        return m.group(1) if m else None
    i += len(rest) - len(rest.lstrip()) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None  # unbalanced: the completion was cut off inside the box


def _answer_tag(text: str) -> str | None:
    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def _hashes(text: str) -> str | None:
    found = re.findall(r"####\s*(.+)", text)  # GSM8K's final-answer marker
    return found[-1].strip() if found else None


def _answer_is(text: str) -> str | None:
    # Up to the end of the sentence: a period followed by space/end (so "3.5." gives "3.5"), or a newline.
    found = re.findall(r"answer is:?\s*(.+?)\s*(?:\.(?:\s|$)|\n|$)", text, flags=re.IGNORECASE)
    return found[-1].strip() if found else None


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "answer_tag": _answer_tag,
    "boxed": _boxed,
    "hashes": _hashes,
    "answer_is": _answer_is,
    "last_line": _last_line,
}
DEFAULT_EXTRACT = ("boxed", "hashes", "answer_is", "last_line")


def extract_answer(text: str, order: Sequence[str] = DEFAULT_EXTRACT) -> str | None:
    """The final answer in ``text``: the content of ``<answer>…</answer>`` if present (searched
    further, so ``<answer>\\boxed{5}</answer>`` gives ``5``), then the first of ``order`` that
    finds something: ``\\boxed{…}`` (nested braces), ``#### X``, "the answer is X", the last line.

    >>> extract_answer("so $x = \\\\boxed{\\\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    >>> extract_answer("Add them.\\n#### 1,234")
    '1,234'
    >>> extract_answer("Therefore the answer is 3.5. Done")
    '3.5'
    >>> extract_answer("<think>2+2</think><answer>4</answer>")
    '4'
    >>> extract_answer("first\\nlast ")
    'last'
    >>> extract_answer("") is None
    True
    """
    tagged = _answer_tag(text)
    if tagged is not None:
        text = tagged
    for key in order:
        found = EXTRACTORS[key](text)
        if found is not None:
            return found
    return None


def normalize_answer(text: str) -> str:
    """Canonical form for string comparison: case, spaces, ``$``, ``\\text{}``, a final period,
    thousands separators, and equal decimals (``72.0`` → ``72``).

    >>> normalize_answer(" $1,000.50$. ")
    '1000.5'
    >>> normalize_answer("\\\\text{ Paris }")
    'paris'
    """
    s = text.strip().replace("$", "")
    s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("\\,", "").strip().rstrip(".").strip()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = " ".join(s.casefold().split())
    try:
        d = Decimal(s)
    except InvalidOperation:
        return s
    if not d.is_finite():
        return s
    out = format(d.normalize(), "f")
    return "0" if out == "-0" else out


def _resolve_extract(extract: str | Sequence[str] | Callable[[str], str | None] | None
                     ) -> Callable[[str], str | None]:
    if extract is None:
        return lambda text: text
    if callable(extract):
        return extract
    order = (extract,) if isinstance(extract, str) else tuple(extract)
    unknown = [k for k in order if k not in EXTRACTORS]
    if unknown:
        raise ConfigError(f"unknown answer extractor(s) {unknown}", where="exact_match(extract=...)",
                          fix=f"use a callable or names from {sorted(EXTRACTORS)}")
    return lambda text: extract_answer(text, order)


# ---------------------------------------------------------------------------- rewards
class exact_match:  # noqa: N801 - a factory that reads like a function
    """1.0 when the completion's extracted answer equals the gold answer, else 0.0.

    ``answer_column``: the dataset column with gold answers (a missing/None gold gives ``None``).
    ``normalize``: compare with :func:`normalize_answer` on both sides. ``extract``: a callable
    ``str -> str | None``, an extractor name or a list of names (see :data:`EXTRACTORS`), or
    ``None`` to compare whole texts. ``extract_gold``: also extract from the gold, so a GSM8K
    solution ending in ``#### 72`` works as the gold.

    >>> reward = exact_match()
    >>> reward(["q", "q", "q"], ["so \\\\boxed{72}", "The answer is 72.0.", "it is 71"],
    ...        answer=["72", "#### 72", "72"])
    [1.0, 1.0, 0.0]
    """

    name = "exact_match"

    def __init__(self, answer_column: str = "answer", normalize: bool = True,
                 extract: str | Sequence[str] | Callable[[str], str | None] | None = DEFAULT_EXTRACT,
                 extract_gold: bool = True):
        self.answer_column, self.normalize, self.extract_gold = answer_column, normalize, extract_gold
        self.extract = _resolve_extract(extract)

    def _canon(self, text: str | None) -> str | None:
        if text is None:
            return None
        return normalize_answer(text) if self.normalize else text.strip()

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        check_batch(prompts, completions, self.name)
        golds = get_column(columns, self.answer_column, len(completions), self.name)
        out: list[float | None] = []
        for completion, gold in zip(completions, golds):
            if gold is None or str(gold).strip() == "":
                out.append(None)
                continue
            gold = str(gold)
            gold_answer = self._canon((self.extract(gold) or gold) if self.extract_gold else gold)
            predicted = self._canon(self.extract(completion))
            out.append(1.0 if predicted is not None and predicted == gold_answer else 0.0)
        return out


class regex_reward:  # noqa: N801
    """``score_match`` when ``re.search(pattern, completion)`` finds a match, else ``score_miss``.

    >>> reward = regex_reward(r"^\\d+$", name="digits_only")
    >>> reward(["a", "b"], ["123", "12 apples"])
    [1.0, 0.0]
    """

    def __init__(self, pattern: str, score_match: float = 1.0, score_miss: float = 0.0, flags: int = 0,
                 name: str = "regex"):
        try:
            self.pattern = re.compile(pattern, flags)
        except re.error as e:
            raise ConfigError(f"invalid regular expression {pattern!r}: {e}", where="regex_reward(pattern=...)",
                              fix="escape special characters such as ( [ { . * + ? with a backslash") from e
        self.score_match, self.score_miss, self.name = float(score_match), float(score_miss), name

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        check_batch(prompts, completions, self.name)
        return [self.score_match if self.pattern.search(c) else self.score_miss for c in completions]


class format_reward:  # noqa: N801
    """Rewards the ``<think>…</think><answer>…</answer>`` layout (R1-style reasoning format).

    1.0 when the completion is exactly a think block followed by an answer block (only whitespace
    around and between them). Otherwise partial credit: ``partial`` (default 0.25) for each of the
    four tags that occurs exactly once, capped at ``3 * partial`` so that only the correct layout
    earns full credit. ``partial=0`` makes the reward all-or-nothing. The tag names are arguments.

    >>> reward = format_reward()
    >>> reward(["q"] * 4, ["<think>add</think>\\n<answer>4</answer>",
    ...                    "<think>add</think> 4",
    ...                    "<answer>4</answer><think>add</think>",
    ...                    "4"])
    [1.0, 0.5, 0.75, 0.0]
    """

    name = "format"

    def __init__(self, think_tag: str = "think", answer_tag: str = "answer", partial: float = 0.25):
        t, a = re.escape(think_tag), re.escape(answer_tag)
        self.layout = re.compile(rf"\s*<{t}>.*?</{t}>\s*<{a}>.*?</{a}>\s*", re.DOTALL)
        self.tags = [f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"]
        self.partial = float(partial)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        check_batch(prompts, completions, self.name)
        out: list[float | None] = []
        for c in completions:
            if self.layout.fullmatch(c) and all(c.count(tag) == 1 for tag in self.tags):
                out.append(1.0)
            else:
                once = sum(c.count(tag) == 1 for tag in self.tags)
                out.append(min(once, 3) * self.partial)
        return out


class length_penalty:  # noqa: N801
    """Soft overlong penalty (DAPO, Yu et al. 2025, eq. 13): 0 up to ``max_len - buffer``, falling
    linearly to -1 at ``max_len``, and -1 beyond. Length is ``count(completion)``: characters by
    default; pass e.g. ``count=lambda s: len(tokenizer.encode(s))`` for tokens.

    >>> reward = length_penalty(max_len=10, buffer=4)
    >>> reward(["q"] * 4, ["x" * 6, "x" * 8, "x" * 10, "x" * 20])
    [0.0, -0.5, -1.0, -1.0]
    """

    name = "length_penalty"

    def __init__(self, max_len: int, buffer: int = 0, count: Callable[[str], int] = len):
        if max_len <= 0 or not 0 <= buffer <= max_len:
            raise ConfigError(f"length_penalty needs max_len > 0 and 0 <= buffer <= max_len; got max_len={max_len}, "
                              f"buffer={buffer}", fix="e.g. max_len=4096, buffer=512")
        self.max_len, self.buffer, self.count = max_len, buffer, count

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        check_batch(prompts, completions, self.name)
        out: list[float | None] = []
        for c in completions:
            over = self.count(c) - (self.max_len - self.buffer)
            out.append(0.0 if over <= 0 else -1.0 if over >= self.buffer else -over / self.buffer)
        return out
