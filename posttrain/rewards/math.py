"""Math answers checked by symbolic equivalence with math-verify (``\\boxed{1/2}`` = ``0.5``).

math-verify bounds each ``parse``/``verify`` step with ``signal.alarm``, which only works in the
main thread of a process, and only with an integer number of seconds (a float makes ``verify``
silently return False). So checks run in worker processes of a ``ProcessPoolExecutor``, and the
caller also waits on each check with its own deadline: a worker stuck in C code (where the alarm
cannot interrupt) or killed outright is replaced instead of hanging training.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from posttrain.errors import ConfigError
from posttrain.rewards.verifiers import check_batch, get_column

# Per-sample outcomes. Rewards: correct 1.0; wrong, unparseable, timeout, error 0.0; no_gold None.
OUTCOMES = ("correct", "wrong", "unparseable", "timeout", "error", "no_gold")


def check_answer(gold: str, prediction: str, timeout_s: int) -> str:
    """One comparison, run inside a worker process; returns an outcome from :data:`OUTCOMES`.

    Pairs of parsed candidates are compared one by one, rather than with one ``verify`` call, so
    that a timeout can be told apart from a plain mismatch (``verify`` reports both as False).
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        golds = parse(gold, parsing_timeout=timeout_s, raise_on_error=True)
    except (Exception, TimeoutException):
        golds = []
    if not golds:
        return "no_gold"  # the data's fault, not the policy's: no reward rather than 0
    try:
        preds = parse(prediction, parsing_timeout=timeout_s, raise_on_error=True)
    except TimeoutException:
        return "timeout"
    except Exception:
        return "unparseable"
    if not preds:
        return "unparseable"
    for g in golds:
        for p in preds:
            try:
                if verify(g, p, timeout_seconds=timeout_s, raise_on_error=True):
                    return "correct"
            except TimeoutException:
                return "timeout"  # stop: another pair could take as long again
            except Exception:
                continue  # e.g. sympy cannot compare these two forms; others may still match
    return "wrong"


def _warm_up() -> None:
    import math_verify  # noqa: F401 - importing sympy takes ~1 s; pay it at pool start, not per check


def _ping() -> int:
    time.sleep(0.05)  # keep this worker busy so the next ping reaches another one
    return os.getpid()


class MathVerifier:
    """Reward 1.0 when the completion's final answer is mathematically equal to the gold answer.

    ``answer_column``: dataset column with the gold answers (plain ``72``, ``$\\frac{1}{2}$``,
    ``\\boxed{x^2}``). The completion's answer is what math-verify extracts (the last ``\\boxed{}``
    first, then LaTeX or plain expressions). ``timeout_s``: integer seconds per parse / comparison
    inside a worker. ``workers``: worker processes (started on first use, reused across calls).
    ``guard_s``: the caller's own deadline per sample (default ``3 * timeout_s + 2``); past it the
    sample is counted as a timeout and the stuck pool is replaced.

    After each call ``last_stats`` counts the outcomes of :data:`OUTCOMES`: ``correct`` (1.0),
    ``wrong`` (0.0), ``unparseable`` (no answer found in the completion, 0.0), ``timeout`` (0.0),
    ``error`` (the sample's worker process died, 0.0) and ``no_gold`` (the gold is missing or
    does not parse: ``None``, the sample is skipped). Use :func:`outcome_metrics` to log fractions.

    Close the worker processes with ``close()`` or a ``with`` block::

        with MathVerifier(workers=2) as reward:
            reward(["q", "q"], ["so \\\\boxed{0.5}", "1/3"], answer=["1/2", "1/2"])   # [1.0, 0.0]
            reward.last_stats   # {'correct': 1, 'wrong': 1, 'unparseable': 0, ...}
    """

    name = "math"

    def __init__(self, answer_column: str = "answer", timeout_s: int = 5, workers: int = 2,
                 guard_s: float | None = None):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
            raise ConfigError(f"timeout_s must be a whole number of seconds >= 1, got {timeout_s!r}",
                              where="MathVerifier(timeout_s=...)",
                              fix="math-verify's timer (signal.alarm) takes integer seconds, e.g. timeout_s=5")
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}", where="MathVerifier(workers=...)")
        self.answer_column, self.timeout_s, self.workers = answer_column, timeout_s, workers
        # Three alarm-bounded steps per sample (parse gold, parse prediction, compare), plus slack.
        self.guard_s = float(guard_s) if guard_s is not None else 3.0 * timeout_s + 2.0
        self.last_stats: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._pool: ProcessPoolExecutor | None = None
        self._check = check_answer  # module-level so workers can unpickle it; tests swap it

    # ------------------------------------------------------------------ pool
    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is not None and getattr(self._pool, "_broken", False):
            self._kill_pool()  # a worker died while idle; submit() would raise
        if self._pool is None:
            # forkserver: workers start as forks of a small clean server, not of this (possibly
            # multi-threaded, torch-laden) process; spawn where forkserver does not exist.
            if "forkserver" in multiprocessing.get_all_start_methods():
                ctx = multiprocessing.get_context("forkserver")
                # Import sympy once in the server (the default preload is just "__main__"), so that
                # replacing a stuck pool costs a fork, not a second of imports. Ignored if the server
                # is already running.
                ctx.set_forkserver_preload(["__main__", "math_verify"])
            else:
                ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_warm_up)
            # Start every worker now so start-up time is not charged to the first samples' deadlines.
            try:
                for f in [pool.submit(_ping) for _ in range(self.workers)]:
                    f.result(timeout=120)
            except Exception as e:
                pool.shutdown(wait=False, cancel_futures=True)
                raise ConfigError(
                    f"could not start math-verify worker processes ({type(e).__name__}: {e})",
                    where="MathVerifier",
                    fix="workers import the main module again: in a script, put its top-level code under "
                        "`if __name__ == '__main__':`; check that math-verify is installed") from e
            self._pool = pool
        return self._pool

    def _kill_pool(self) -> None:
        """Stop the workers now, even one stuck in C code. ``shutdown`` alone would wait for it."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # ProcessPoolExecutor has no public kill before Python 3.14; _processes maps pid -> Process.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the worker processes. A later call starts new ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill_pool()
        except Exception:
            pass

    # ------------------------------------------------------------------ reward
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        check_batch(prompts, completions, self.name)
        golds = get_column(columns, self.answer_column, len(completions), self.name)
        outcomes: list[str | None] = [None] * len(completions)
        queue: deque[int] = deque()
        for i, gold in enumerate(golds):
            if gold is None or str(gold).strip() == "":
                outcomes[i] = "no_gold"
            else:
                queue.append(i)
        # Samples in flight when a worker died. Which one killed it is unknown, so they are rerun
        # one at a time; a sample that breaks a pool while running alone is an "error".
        retry: deque[int] = deque()
        alone: int | None = None

        # At most `workers` samples in flight, so each starts as soon as it is submitted and its
        # deadline can be counted from submission.
        running: dict[Future, tuple[int, float]] = {}
        while queue or retry or running:
            pool = self._get_pool()
            if retry:
                if not running:
                    alone = retry.popleft()
                    running[pool.submit(self._check, str(golds[alone]), str(completions[alone]),
                                        self.timeout_s)] = (alone, time.monotonic())
            else:
                alone = None
                while queue and len(running) < self.workers:
                    i = queue.popleft()
                    fut = pool.submit(self._check, str(golds[i]), str(completions[i]), self.timeout_s)
                    running[fut] = (i, time.monotonic())
            next_deadline = min(t0 for _, t0 in running.values()) + self.guard_s
            done, _ = wait(running, timeout=max(0.0, next_deadline - time.monotonic()),
                           return_when=FIRST_COMPLETED)
            died = False
            for fut in done:
                i, _ = running.pop(fut)
                try:
                    outcomes[i] = fut.result()
                except BrokenProcessPool:
                    died = True
                    if i == alone:
                        outcomes[i] = "error"
                    else:
                        retry.append(i)
            now = time.monotonic()
            stuck = [f for f, (_, t0) in running.items() if now - t0 >= self.guard_s]
            for fut in stuck:
                outcomes[running.pop(fut)[0]] = "timeout"
            if died or stuck:
                # Whatever else was in flight shares the broken or stuck pool: run it again.
                (retry if died else queue).extendleft(i for i, _ in running.values())
                running.clear()
                self._kill_pool()

        self.last_stats = dict.fromkeys(OUTCOMES, 0)
        rewards: list[float | None] = []
        for outcome in outcomes:
            assert outcome is not None
            self.last_stats[outcome] += 1
            rewards.append(None if outcome == "no_gold" else 1.0 if outcome == "correct" else 0.0)
        return rewards
