import os
import time
from pathlib import Path

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.rewards import MathVerifier, outcome_metrics
from posttrain.rewards.math import check_answer


# Worker stand-ins. They live at module level so worker processes can unpickle them by name.
def sleepy_check(gold: str, prediction: str, timeout_s: int) -> str:
    if prediction == "HANG":
        time.sleep(600)  # stands for a worker stuck where signal.alarm cannot reach
    return check_answer(gold, prediction, timeout_s)


def crashing_check(gold: str, prediction: str, timeout_s: int) -> str:
    if prediction == "CRASH":
        os._exit(1)  # stands for a segfault or an OOM kill
    return check_answer(gold, prediction, timeout_s)


@pytest.fixture(scope="module")
def verifier():
    """One pool for the module: workers start once (~1 s) and are reused."""
    with MathVerifier(timeout_s=1, workers=2) as v:
        yield v


def test_equivalent_answers_are_correct(verifier):
    got = verifier(["q"] * 4, [r"so \boxed{72}", "0.5", "$x^2+2x+1$", r"We get $\frac{3}{4}$"],
                   answer=["72", "1/2", "$(x+1)^2$", "0.75"])
    assert got == [1.0, 1.0, 1.0, 1.0]
    assert verifier.last_stats == {"correct": 4, "wrong": 0, "unparseable": 0, "timeout": 0, "error": 0, "no_gold": 0}


def test_wrong_unparseable_and_missing_gold(verifier):
    got = verifier(["q"] * 5, [r"\boxed{71}", "I have no idea", "", "72", "72"],
                   answer=["72", "72", "72", None, "no numbers here"])
    assert got == [0.0, 0.0, 0.0, None, None]
    assert verifier.last_stats == {"correct": 0, "wrong": 1, "unparseable": 2, "timeout": 0, "error": 0, "no_gold": 2}
    assert outcome_metrics(verifier)["reward/math_unparseable_frac"] == pytest.approx(0.4)


def test_slow_verify_hits_the_inner_timeout(verifier):
    # Expanding (x+1)^200000 takes sympy far longer than 1 s; math-verify's alarm stops it.
    start = time.monotonic()
    got = verifier(["q", "q"], ["$(x+1)^{200000}$", "3"], answer=["1", "3"])
    assert time.monotonic() - start < verifier.guard_s
    assert got == [0.0, 1.0]
    assert verifier.last_stats["timeout"] == 1 and verifier.last_stats["correct"] == 1


def test_stuck_worker_is_abandoned_at_the_guard(verifier, monkeypatch):
    monkeypatch.setattr(verifier, "_check", sleepy_check)
    monkeypatch.setattr(verifier, "guard_s", 1.5)
    verifier(["q"], ["1"], answer=["1"])  # make sure the pool is up before timing
    old_pids = list(verifier._pool._processes)
    start = time.monotonic()
    got = verifier(["q", "q"], ["7", "HANG"], answer=["7", "7"])
    elapsed = time.monotonic() - start
    assert got == [1.0, 0.0]
    assert verifier.last_stats["timeout"] == 1 and verifier.last_stats["correct"] == 1
    assert 1.5 <= elapsed < 1.5 + 1.0
    time.sleep(0.2)
    for pid in old_pids:  # the stuck worker was killed, not left running
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(") ")[1][0] in "ZX"
    assert verifier(["q"], [r"\boxed{2}"], answer=["2"]) == [1.0]  # a fresh pool serves the next call


def test_crashing_worker_is_an_error_not_a_hang(verifier, monkeypatch):
    monkeypatch.setattr(verifier, "_check", crashing_check)
    got = verifier(["q"] * 4, ["5", "CRASH", "6", "7"], answer=["5", "5", "6", "7"])
    assert got == [1.0, 0.0, 1.0, 1.0]  # samples in flight beside the crash are rerun, not blamed
    assert verifier.last_stats["error"] == 1 and verifier.last_stats["correct"] == 3
    next(iter(verifier._pool._processes.values())).kill()  # a worker that dies between calls
    time.sleep(0.3)
    assert verifier(["q"], ["8"], answer=["8"]) == [1.0]


def test_setup_errors():
    with pytest.raises(ConfigError, match="whole number of seconds"):
        MathVerifier(timeout_s=2.5)
    with pytest.raises(ConfigError, match="whole number of seconds"):
        MathVerifier(timeout_s=0)
    with pytest.raises(DataError, match="needs the dataset column 'answer'"):
        MathVerifier()(["q"], ["1"], solution=["1"])  # fails before any worker starts
