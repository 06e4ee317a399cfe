"""Combining rewards, loading user reward functions, and the registry of built-ins.

    reward = weighted_sum([(resolve_reward("math"), 1.0), (resolve_reward("format"), 0.2)])
    reward = resolve_reward("my_pkg.rewards:brevity")            # a user function
    reward = resolve_reward("rewards/mine.py:Scorer", scale=2)   # a user class, built with kwargs
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, DataError
from posttrain.rewards.builtin import BUILTIN_REWARDS
from posttrain.rewards.code import CodeTestsReward
from posttrain.rewards.math import MathVerifier
from posttrain.rewards.verifiers import (
    check_batch,
    exact_match,
    format_reward,
    length_penalty,
    regex_reward,
    reward_name,
)


class weighted_sum:  # noqa: N801 - a factory that reads like a function
    """``sum(weight * reward)`` over components, sample by sample.

    A component's ``None`` makes the sum ``None`` (the sample is skipped), unless ``none_as`` gives
    a value to use instead. After each call ``last_components`` maps each component's name to its
    raw values (``None`` kept) for logging as ``reward/<name>``; repeated names get ``_2``, ``_3``.

    >>> both = weighted_sum([(exact_match(), 1.0), (format_reward(), 0.5)])
    >>> both(["q", "q"], ["<think>x</think><answer>4</answer>", "4"], answer=["4", None])
    [1.5, None]
    >>> both.last_components
    {'exact_match': [1.0, None], 'format': [1.0, 0.0]}
    >>> weighted_sum([(exact_match(), 1.0)], none_as=0.0)(["q"], ["4"], answer=[None])
    [0.0]
    """

    def __init__(self, rewards: list[tuple[Callable[..., list], float]], none_as: float | None = None,
                 name: str = "weighted_sum"):
        if not rewards:
            raise ConfigError("weighted_sum needs at least one (reward, weight) pair",
                              fix="weighted_sum([(exact_match(), 1.0)])")
        self.components: dict[str, tuple[Callable[..., list], float]] = {}
        for item in rewards:
            if not (isinstance(item, tuple) and len(item) == 2 and callable(item[0])):
                raise ConfigError(f"weighted_sum takes (reward_function, weight) pairs, got {item!r}",
                                  fix="weighted_sum([(exact_match(), 1.0), (format_reward(), 0.2)])")
            fn, weight = item
            base = key = reward_name(fn)
            n = 1
            while key in self.components:
                n += 1
                key = f"{base}_{n}"
            self.components[key] = (fn, float(weight))
        self.none_as, self.name = none_as, name
        self.last_components: dict[str, list[float | None]] = {}

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        check_batch(prompts, completions, self.name)
        self.last_components = {key: list(fn(prompts, completions, **columns))
                                for key, (fn, _) in self.components.items()}
        weights = {key: w for key, (_, w) in self.components.items()}
        return sum_components(self.last_components, weights, n=len(completions),
                              none="propagate" if self.none_as is None else self.none_as)

    def close(self) -> None:
        """Close components that hold worker processes."""
        for fn, _ in self.components.values():
            if hasattr(fn, "close"):
                fn.close()


def _reward_model(**kwargs: Any) -> Callable[..., list]:
    # Imported on use: the scorer needs torch and transformers, the other rewards do not.
    from posttrain.rewards.reward_model import RewardModelScorer

    return RewardModelScorer(**kwargs)


REWARD_FUNCTIONS: dict[str, Callable[..., Callable[..., list]]] = {
    "exact_match": exact_match,
    "math": MathVerifier,
    "code": CodeTestsReward,
    "format": format_reward,
    "regex": regex_reward,
    "length_penalty": length_penalty,
    "reward_model": _reward_model,
}
"""Built-in reward factories by name: ``REWARD_FUNCTIONS[name](**kwargs)`` returns the reward."""


def _import_target(module_part: str, spec: str) -> Any:
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part).expanduser()
        if not path.is_file():
            raise ConfigError(f"reward file {str(path)!r} does not exist", where=spec,
                              fix="give a path to a .py file relative to the working directory, or an absolute one")
        # A stable, unique module name so classes and functions defined there can be pickled.
        mod_name = "posttrain_user_reward_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"cannot load {str(path)!r} as a Python module", where=spec,
                              fix="give a .py file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise ConfigError(f"importing {str(path)!r} failed: {type(e).__name__}: {e}", where=spec,
                              fix="fix the error in that file (run `python FILE` to see the traceback)") from e
        return module
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as e:
        if e.name is not None and module_part.startswith(e.name) and module_part[len(e.name):][:1] in ("", "."):
            raise ConfigError(f"module {module_part!r} not found", where=spec,
                              fix=f"check the spelling, install the package that provides {e.name!r}, run from the directory that "
                                  "contains it (or add it to PYTHONPATH), or give a file path: path/to/file.py:function"
                              ) from e
        raise ConfigError(f"importing {module_part!r} failed: {e}", where=spec,
                          fix=f"install {e.name!r}, which that module imports") from e
    except Exception as e:
        raise ConfigError(f"importing {module_part!r} failed: {type(e).__name__}: {e}", where=spec,
                          fix="fix the error in that module (import it in Python to see the traceback)") from e


def load_reward_function(spec: str) -> Any:
    """Import ``"package.module:function"`` or ``"path/to/file.py:function"`` (the attribute may be
    dotted: ``module:Class.method``). Returns the object, which must be callable; errors say which
    step failed (no such module or file, no such attribute, not callable) and how to fix it.

    >>> load_reward_function("posttrain.rewards.verifiers:format_reward").name
    'format'
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"reward function {spec!r} is not of the form 'module:function'",
                          fix="write package.module:function or path/to/file.py:function")
    module_part, attr = spec.rsplit(":", 1)  # rsplit: a Windows path has a colon of its own
    if not module_part or not attr:
        raise ConfigError(f"reward function {spec!r} is missing the module or the function name",
                          fix="write package.module:function or path/to/file.py:function")
    obj = _import_target(module_part, spec)
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"callables there: {', '.join(names[:12]) or 'none'}"
            raise ConfigError(f"{getattr(obj, '__name__', module_part)!r} has no attribute {part!r}", where=spec,
                              fix=hint)
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{attr!r} in {module_part!r} is a {type(obj).__name__}, not a function", where=spec,
                          fix="point at a function f(prompts, completions, **columns) -> list[float | None], "
                              "or a class whose instances are such functions")
    return obj


def _build(factory: Callable[..., Any], spec: str, kwargs: dict[str, Any]) -> Callable[..., list]:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: let the call decide
        sig = None
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise ConfigError(f"reward {spec!r} does not accept the arguments {sorted(kwargs)}: {e}",
                              fix=f"its arguments are: {', '.join(sig.parameters) or 'none'}") from e
    reward = factory(**kwargs)
    if not callable(reward):
        raise ConfigError(f"{spec!r} called with {sorted(kwargs)} returned a {type(reward).__name__}, not a "
                          "reward function", fix="a factory must return f(prompts, completions, **columns)")
    return reward


def resolve_reward(spec: str | Callable[..., list], **kwargs: Any) -> Callable[..., list]:
    """A reward function from a built-in name, a ``module:function`` / ``file.py:function`` spec,
    or a callable (returned as is).

    Built-in names (:data:`REWARD_FUNCTIONS`) are factories called with ``kwargs``. A loaded class
    is instantiated with ``kwargs``. A loaded function is the reward itself; given ``kwargs`` it is
    called with them as a factory that returns the reward.

    >>> resolve_reward("exact_match", answer_column="solution").answer_column
    'solution'
    >>> resolve_reward("exact")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: unknown reward 'exact'. Fix: did you mean 'exact_match'? ...
    """
    if callable(spec) and not isinstance(spec, str):
        if kwargs:
            raise ConfigError("keyword arguments were given with a reward that is already a function",
                              where=reward_name(spec), fix="build the reward with its arguments yourself, or pass a name")
        return spec
    if spec in REWARD_FUNCTIONS:
        return _build(REWARD_FUNCTIONS[spec], spec, kwargs)
    if isinstance(spec, str) and ":" in spec:
        target = load_reward_function(spec)
        return _build(target, spec, kwargs) if inspect.isclass(target) or kwargs else target
    close = difflib.get_close_matches(str(spec), REWARD_FUNCTIONS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown reward {spec!r}",
                      fix=f"{hint}built-ins: {', '.join(REWARD_FUNCTIONS)}; or give package.module:function "
                          "or path/to/file.py:function")


def _fn_name(fn, spec: str) -> str:
    """The name a reward is logged under (``reward/<name>``): rm for a reward model, else the
    reward's own name (``posttrain.rewards.reward_name``)."""
    if spec.startswith("rm:"):
        return "rm"
    return reward_name(fn)


def load_rewards(specs: list[str], weights: list[float]) -> list[tuple[str, Callable, float]]:
    """(name, callable, weight) for every reward spec: builtin_correct | builtin_gold | rm:<path> |
    any spec :func:`posttrain.rewards.resolve_reward` knows (exact_match, math, module:function)."""
    if not specs:
        raise ConfigError("no reward given", where="reward", fix="e.g. reward=builtin_correct")
    weights = list(weights) or [1.0] * len(specs)
    out, seen = [], set()
    for spec, w in zip(specs, weights):
        if spec in BUILTIN_REWARDS:
            fn = BUILTIN_REWARDS[spec]
        elif spec.startswith("rm:"):
            fn = _reward_model(model=spec[3:], where="reward")
        else:
            fn = resolve_reward(spec)
        name = spec if spec in BUILTIN_REWARDS else _fn_name(fn, spec)
        while name in seen:
            name += "_"
        seen.add(name)
        out.append((name, fn, float(w)))
    return out


def default_reward(specs: list[str], prompts: str, builtin: str) -> list[str]:
    """The reward list with its default filled in: the built-in task's reward ``builtin`` only when the
    prompts are the built-in task's. With the user's own prompts there is no default (an empty list,
    which :func:`check_reward_config` refuses): a built-in reward would score every completion 0."""
    if specs:
        return list(specs)
    return [builtin] if prompts.startswith("builtin:") else []


def check_reward_config(specs: list[str], weights: list[float], prompts: str | None = None) -> None:
    if weights and len(weights) != len(specs):
        raise ConfigError(f"{len(weights)} reward_weights for {len(specs)} rewards", where="reward_weights",
                          fix=f"give {len(specs)} weights (or none for all 1.0)")
    if not specs:
        mine = prompts is not None and not prompts.startswith("builtin:")
        raise ConfigError("no reward given" + (f" for your prompts ({prompts}); the built-in task's rewards would "
                                               "score every completion 0" if mine else ""), where="reward",
                          fix="e.g. reward=[exact_match] or [math] with an answer column, rm:<reward model dir>, "
                              "or module:function (docs/rewards.md)" if mine else "e.g. reward=builtin_correct")


def sum_components(components: dict[str, list], weights: dict[str, float], *, none: str | float = "propagate",
                   n: int | None = None, mismatch_error: type = ConfigError) -> list[float | None]:
    """The one combination rule: Σ_k weight_k · value_k, sample by sample, over reward components.

    A component's ``None`` ("does not apply to this sample") is handled by ``none``:
    ``"propagate"``: the sample's sum is None; a number: used as the value; ``"skip"``: the component
    is left out of that sample's sum, which is None only when no component applies (the RL commands'
    rule). Every list must hold ``n`` values (default: the first list's length); ``mismatch_error``
    is raised otherwise, and a DataError for a non-finite value."""
    names = list(components)
    n = len(components[names[0]]) if n is None and names else (n or 0)
    totals: list[float | None] = [None if none == "skip" else 0.0] * n
    for name in names:
        vals = components[name]
        if len(vals) != n:
            raise mismatch_error(f"reward '{name}' returned {len(vals)} values for {n} completions",
                              where=f"reward {name}", fix="a reward function returns one float (or None) per completion")
        for i, v in enumerate(vals):
            if v is None:
                if none == "skip":
                    continue
                if none == "propagate":
                    totals[i] = None
                    continue
                v = none
            elif not math.isfinite(float(v)):
                raise DataError(f"reward '{name}' returned {float(v)} for completion {i}", where=f"reward {name}",
                                fix="return a finite float, or None where the reward does not apply")
            if totals[i] is not None or none == "skip":
                totals[i] = (totals[i] or 0.0) + weights[name] * float(v)
    return totals


def combine_rewards(components: dict[str, list], weights: dict[str, float]):
    """The RL commands' rewards: :func:`sum_components` with ``none="skip"`` (a sample no function
    applies to is left out of the loss). -> (total [N] fp32 tensor, valid [N] bool tensor)."""
    import torch  # here, not at the top: importing posttrain.rewards stays cheap (math-verify workers)

    totals = sum_components(components, weights, none="skip", mismatch_error=DataError)
    valid = torch.tensor([t is not None for t in totals], dtype=torch.bool)
    total = torch.tensor([0.0 if t is None else t for t in totals], dtype=torch.float64)
    return total.float(), valid
