import doctest
import time

import pytest

import posttrain.rewards.code as code_module
from posttrain.errors import ConfigError, DataError
from posttrain.rewards import CodeTestsReward, extract_code, split_tests

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(5, 5) == 10"]


@pytest.fixture(scope="module")
def reward():
    with CodeTestsReward(timeout_s=2, memory_mb=256, workers=2) as r:
        yield r


def run(reward, code, tests=ADD_TESTS):
    return reward(["q"], [code], tests=[tests])[0], reward.last_results[0]


def test_docstring_examples():
    assert doctest.testmod(code_module).failed == 0


def test_correct_code_in_a_fence(reward):
    completion = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    score, result = run(reward, completion)
    assert score == 1.0
    assert (result.outcome, result.passed, result.total, result.error) == ("passed", 3, 3, None)


def test_wrong_and_partial(reward):
    score, result = run(reward, "def add(a, b):\n    return a - b")
    assert (score, result.outcome, result.passed) == (0.0, "failed", 0)
    assert result.error == "test 0: AssertionError: "
    score, result = run(reward, "def add(a, b):\n    return 10")
    assert score == pytest.approx(1 / 3) and result.passed == 1
    strict = CodeTestsReward(partial_credit=False)
    assert strict(["q"], ["def add(a, b):\n    return 10"], tests=[ADD_TESTS]) == [0.0]


def test_string_tests_with_setup(reward):
    tests = "import math\nexpected = 4\nassert add(2, 2) == expected\nassert add(1, 1) == math.floor(2.5)\n"
    score, result = run(reward, "def add(a, b): return a + b", tests)
    assert (score, result.total) == (1.0, 2)
    failing_setup = "from nowhere import thing\nassert add(1, 1) == 2"
    score, result = run(reward, "def add(a, b): return a + b", failing_setup)
    assert score == 0.0 and result.error.startswith("test 0: ModuleNotFoundError")


def test_solution_errors(reward):
    score, result = run(reward, "def add(a, b) return a + b")
    assert (score, result.outcome) == (0.0, "error") and "SyntaxError" in result.error
    # Example usage that raises after the function is defined: the tests still decide.
    score, result = run(reward, "def add(a, b):\n    return a + b\nprint(add(1))")
    assert (score, result.outcome) == (1.0, "passed")
    # Output is discarded and cannot forge a result; exiting early gives no result at all.
    forged = 'import os, sys\nprint("0" * 32 + \' {"passed": 3}\')\nos._exit(0)'
    score, result = run(reward, forged)
    assert (score, result.outcome) == (0.0, "error")


def test_infinite_loop_times_out(reward):
    start = time.monotonic()
    score, result = run(reward, "def add(a, b):\n    while True:\n        pass")
    assert time.monotonic() - start < reward.timeout_s + 1.0
    assert (score, result.outcome) == (0.0, "timeout")


def test_big_allocation_is_a_memory_error(reward):
    score, result = run(reward, "data = bytearray(2 * 1024**3)\ndef add(a, b):\n    return a + b")
    assert (score, result.outcome) == (0.0, "memory")
    assert result.error == "solution: MemoryError: "


def test_big_file_write_is_stopped(reward):
    code = ("def add(a, b):\n"
            "    with open('big.bin', 'wb') as f:\n"
            "        for _ in range(64):\n"
            "            f.write(b'x' * 2**20)\n"
            "    return a + b")
    score, result = run(reward, code, ["assert add(1, 2) == 3"])
    assert (score, result.outcome) == (0.0, "failed")
    assert result.error == "test 0: OSError: [Errno 27] File too large"


def test_runs_in_an_isolated_temp_dir(reward):
    code = "import os, sys\ndef probe():\n    return os.getcwd(), sorted(os.environ), sys.flags.isolated"
    tests = ["cwd, env, iso = probe()\nassert 'posttrain-code-' in cwd and iso == 1",
             "assert 'VIRTUAL_ENV' not in probe()[1] and 'PYTHONPATH' not in probe()[1]",
             "import resource\nassert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)"]
    assert run(reward, code, tests)[0] == 1.0


def test_parallel_batch_with_mixed_outcomes(reward):
    completions = ["def add(a, b): return a + b", "def add(a, b): return None", "import time\ntime.sleep(60)",
                   "def add(a, b): return a + b", "def add(a, b): return b + a", "no code here"]
    start = time.monotonic()
    got = reward(["q"] * 6, completions, tests=[ADD_TESTS] * 5 + [None])
    elapsed = time.monotonic() - start
    assert got == [1.0, 0.0, 0.0, 1.0, 1.0, None]
    assert reward.last_stats == {"passed": 3, "failed": 1, "error": 0, "timeout": 1, "memory": 0, "no_tests": 1}
    assert elapsed < 2 * reward.timeout_s  # the 2 s sleeper did not serialize the others


def test_extract_code_prefers_the_last_python_block():
    text = "```bash\npip install x\n```\n```python\na = 1\n```\n```python\na = 2\n```"
    assert extract_code(text) == "a = 2\n"
    assert extract_code("```python\nx = 1\n(truncated") == "x = 1\n(truncated"
    assert extract_code("```bash\nls\n```") == "```bash\nls\n```"  # not Python: the whole text


def test_split_tests_and_bad_tests():
    assert split_tests("check(add)") == [("check(add)", True)]
    assert split_tests("def helper():\n    return 1") == [("def helper():\n    return 1", False)]
    assert split_tests(None) == []
    with pytest.raises(DataError, match="do not parse as Python"):
        split_tests("assert (")
    with pytest.raises(DataError, match="does not parse as Python"):
        split_tests(["assert add(1, 2) == 3", "assert ("])
    with pytest.raises(DataError, match="got int"):
        split_tests(5)
    with pytest.raises(ConfigError, match="timeout_s > 0"):
        CodeTestsReward(timeout_s=0)
