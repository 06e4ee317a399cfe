import doctest
import textwrap

import pytest

import posttrain.rewards.combine as combine_module
from posttrain.errors import ConfigError
from posttrain.rewards import (REWARD_FUNCTIONS, CodeTestsReward, MathVerifier, exact_match, format_reward,
                               load_reward_function, resolve_reward, weighted_sum)

USER_MODULE = textwrap.dedent("""
    LIMIT = 3

    def brevity(prompts, completions, **columns):
        return [1.0 if len(c) <= LIMIT else 0.0 for c in completions]

    def make_contains(word):
        def contains(prompts, completions, **columns):
            return [float(word in c) for c in completions]
        contains.name = "contains_" + word
        return contains

    class Scaled:
        name = "scaled"

        def __init__(self, scale=1.0):
            self.scale = scale

        def __call__(self, prompts, completions, **columns):
            return [self.scale * len(c) for c in completions]
""")


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_MODULE)
    return path


def test_docstring_examples():
    assert doctest.testmod(combine_module).failed == 0


def constant(value, name):
    def fn(prompts, completions, **columns):
        return [value] * len(completions)
    fn.name = name
    return fn


def test_weighted_sum_values_and_components():
    reward = weighted_sum([(constant(1.0, "a"), 2.0), (constant(0.5, "b"), -1.0), (constant(3.0, "a"), 0.1)])
    assert reward(["p", "q"], ["x", "y"]) == [pytest.approx(1.8), pytest.approx(1.8)]
    assert reward.last_components == {"a": [1.0, 1.0], "b": [0.5, 0.5], "a_2": [3.0, 3.0]}
    assert reward.name == "weighted_sum"


def test_weighted_sum_none_handling():
    def sometimes(prompts, completions, **columns):
        return [None if c == "skip" else 1.0 for c in completions]

    parts = [(sometimes, 1.0), (constant(1.0, "one"), 1.0)]
    assert weighted_sum(parts)(["p", "p"], ["skip", "ok"]) == [None, 2.0]
    assert weighted_sum(parts, none_as=-0.5)(["p", "p"], ["skip", "ok"]) == [0.5, 2.0]


def test_weighted_sum_errors():
    with pytest.raises(ConfigError, match="at least one"):
        weighted_sum([])
    with pytest.raises(ConfigError, match="pairs"):
        weighted_sum([exact_match()])
    broken = weighted_sum([(lambda p, c, **k: [1.0], 1.0)])
    with pytest.raises(ConfigError, match="returned 1 values for 2 completions"):
        broken(["p", "q"], ["x", "y"])


def test_load_module_function(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    fn = load_reward_function("my_rewards:brevity")
    assert fn(["p", "p"], ["abc", "abcd"]) == [1.0, 0.0]
    assert load_reward_function("posttrain.rewards.verifiers:normalize_answer")("7.0") == "7"


def test_load_file_path(user_file):
    fn = load_reward_function(f"{user_file}:brevity")
    assert fn(["p"], ["ab"]) == [1.0]
    # The same file loads once, so module state is shared and classes can be pickled by name.
    assert load_reward_function(f"{user_file}:Scaled") is load_reward_function(f"{user_file}:Scaled")


@pytest.mark.parametrize("spec, message, fix", [
    ("no_such_pkg_xyz.rewards:f", "module 'no_such_pkg_xyz.rewards' not found", "PYTHONPATH"),
    ("posttrain.rewards.verifiers:exact_mach", "has no attribute 'exact_mach'", "did you mean exact_match"),
    ("posttrain.rewards.verifiers:DEFAULT_EXTRACT", "is a tuple, not a function", "f(prompts, completions"),
    ("posttrain.rewards.verifiers", "not of the form 'module:function'", "package.module:function"),
    ("posttrain.rewards.verifiers:", "missing the module or the function", "package.module:function"),
    ("missing/dir/rewards.py:f", "reward file 'missing/dir/rewards.py' does not exist", "path to a .py file"),
])
def test_load_errors_say_what_and_how_to_fix(spec, message, fix):
    with pytest.raises(ConfigError) as info:
        load_reward_function(spec)
    text = str(info.value)
    assert message in text and fix in text and spec in text


def test_load_error_inside_the_user_module(tmp_path):
    bad = tmp_path / "bad_rewards.py"
    bad.write_text("import not_installed_dependency_xyz\n")
    with pytest.raises(ConfigError, match="importing .*bad_rewards.py' failed: ModuleNotFoundError"):
        load_reward_function(f"{bad}:f")
    broken = tmp_path / "broken_rewards.py"
    broken.write_text("def f(:\n")
    with pytest.raises(ConfigError, match="SyntaxError"):
        load_reward_function(f"{broken}:f")


def test_resolve_builtins():
    assert set(REWARD_FUNCTIONS) == {"exact_match", "math", "code", "format", "regex", "length_penalty",
                                     "reward_model"}
    assert isinstance(resolve_reward("math", timeout_s=2), MathVerifier)
    assert isinstance(resolve_reward("code", memory_mb=128), CodeTestsReward)
    assert resolve_reward("format")(["p"], ["<think>a</think><answer>b</answer>"]) == [1.0]
    assert resolve_reward("regex", pattern="^ok")(["p", "p"], ["ok!", "no"]) == [1.0, 0.0]
    own = format_reward()
    assert resolve_reward(own) is own


def test_resolve_user_specs(user_file):
    assert resolve_reward(f"{user_file}:brevity")(["p"], ["abcdef"]) == [0.0]
    scaled = resolve_reward(f"{user_file}:Scaled", scale=2.0)  # a class is built with the kwargs
    assert scaled(["p"], ["abc"]) == [6.0]
    assert resolve_reward(f"{user_file}:Scaled")(["p"], ["ab"]) == [2.0]
    contains = resolve_reward(f"{user_file}:make_contains", word="cat")  # a function + kwargs: a factory
    assert contains.name == "contains_cat" and contains(["p", "p"], ["a cat", "dog"]) == [1.0, 0.0]


def test_resolve_errors(user_file):
    with pytest.raises(ConfigError, match="did you mean 'format'"):
        resolve_reward("formt")
    with pytest.raises(ConfigError, match=r"does not accept the arguments \['colum'\].*answer_column"):
        resolve_reward("exact_match", colum="x")
    with pytest.raises(ConfigError, match="already a function"):
        resolve_reward(format_reward(), partial=0.0)
    with pytest.raises(ConfigError, match="returned a list, not a reward function"):
        resolve_reward(f"{user_file}:brevity", prompts=[], completions=[])
