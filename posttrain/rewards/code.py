"""Code rewards: run the completion's Python against unit tests in a limited subprocess.

Each sample runs in its own ``python -I`` process (isolated mode: no user site, no PYTHON* env
variables, no script directory on sys.path) in a fresh temporary directory, with a stripped
environment and its own process group. Before any user code runs, the child lowers its own limits
with ``resource.setrlimit``: address space (memory), CPU seconds, open files, file size, no core
dumps. The parent kills the whole process group at the wall-clock timeout.

The limits are set by the child's first lines rather than in a ``preexec_fn``: ``preexec_fn`` is
documented as unsafe in a process with threads (the trainer has many) and could deadlock the fork;
here nothing runs before the limits except our fixed harness code.

This stops accidents (infinite loops, runaway memory, huge files, stray prints), not an adversary:
the code runs as the trainer's user, can read its files and use the network. Run the trainer in a
container when the policy may produce hostile code.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError, DataError
from posttrain.rewards.verifiers import check_batch, get_column

OUTCOMES = ("passed", "failed", "error", "timeout", "memory", "no_tests")

# Runs in the child. Reads {"code", "tests": [[source, is_test], ...], limits, "nonce", "capture"} from
# stdin, prints one line "<nonce> <json result>" on a private copy of stdout. User output goes to
# /dev/null (with "capture": N, Python-level prints go to a buffer whose last N characters are returned),
# so it can neither flood the parent nor forge the result without the nonce.
_HARNESS = r"""
import json, os, resource, sys
p = json.loads(sys.stdin.read())
for lim, val in ((resource.RLIMIT_AS, p["memory"]), (resource.RLIMIT_CPU, p["cpu"]),
                 (resource.RLIMIT_FSIZE, p["fsize"]), (resource.RLIMIT_NOFILE, p["nofile"]),
                 (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (val, val))
out = os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
if p["capture"]:  # the Python tool: what the code prints is its answer
    import io
    sys.stdout = sys.stderr = io.StringIO()
res = {"passed": 0, "total": sum(t for _, t in p["tests"]), "error": None, "memory": False}
def note(e, where):
    if isinstance(e, MemoryError):
        res["memory"] = True
    if res["error"] is None:
        res["error"] = f"{where}: {type(e).__name__}: {e}"[:500]
ns = {"__name__": "solution"}
try:
    exec(compile(p["code"], "<solution>", "exec"), ns)
except BaseException as e:
    note(e, "solution")
    res["solution_failed"] = True
setup_ok = True
for i, (src, is_test) in enumerate(p["tests"]):
    try:
        if not setup_ok:
            raise RuntimeError("test setup failed")
        exec(compile(src, f"<test {i}>", "exec"), ns)
        res["passed"] += bool(is_test)
    except BaseException as e:
        note(e, f"test {i}")
        setup_ok = setup_ok and bool(is_test)
if p["capture"]:
    res["stdout"] = sys.stdout.getvalue()[-p["capture"]:]
os.write(out, (p["nonce"] + " " + json.dumps(res) + "\n").encode())
os._exit(0)  # skip user atexit handlers and non-daemon threads
"""


@dataclass
class CodeResult:
    """What one sample's run gave: ``outcome`` from :data:`OUTCOMES`, tests passed / total, and
    the first error (``"test 2: AssertionError: "``) for debugging."""

    outcome: str
    passed: int = 0
    total: int = 0
    error: str | None = None


def extract_code(text: str) -> str:
    """The last fenced ``python``/``py`` block, else the last untagged fenced block, else the whole
    text. An unclosed final fence (a truncated completion) still counts.

    >>> extract_code("Here:\\n```python\\nx = 1\\n```\\nand\\n```py\\nx = 2\\n```")
    'x = 2\\n'
    >>> extract_code("```\\nprint(1)\\n```")
    'print(1)\\n'
    >>> extract_code("def f(): return 1")
    'def f(): return 1'
    """
    blocks = re.findall(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", text, flags=re.DOTALL)
    tagged = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    untagged = [body for lang, body in blocks if not lang]
    return (tagged or untagged or [text])[-1]


def split_tests(tests: str | list[str] | None, where: str = "tests") -> list[tuple[str, bool]]:
    """Tests as ``(source, is_test)`` pieces run in order in the solution's namespace.

    A list: each item is one test (it may hold several statements; all must pass). A string: each
    top-level ``assert`` or bare expression (e.g. ``check(solve)``) is one test; other statements
    (imports, definitions, assignments) are setup, and a failing setup fails every later test.

    >>> split_tests("import math\\nassert f(1) == 2\\nassert f(2) == 3")
    [('import math', False), ('assert f(1) == 2', True), ('assert f(2) == 3', True)]
    >>> split_tests(["assert f(1) == 2", "x = f(2)\\nassert x == 3"])
    [('assert f(1) == 2', True), ('x = f(2)\\nassert x == 3', True)]
    """
    if tests is None:
        return []
    if isinstance(tests, str):
        try:
            tree = ast.parse(tests)
        except SyntaxError as e:
            raise DataError(f"the tests do not parse as Python: {e}", where=where,
                            fix="fix the test code in the dataset") from e
        return [(ast.get_source_segment(tests, node) or "", isinstance(node, (ast.Assert, ast.Expr)))
                for node in tree.body]
    if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
        for t in tests:
            try:
                compile(t, "<test>", "exec")
            except SyntaxError as e:
                raise DataError(f"test {t!r} does not parse as Python: {e}", where=where,
                                fix="fix the test code in the dataset") from e
        return [(t, True) for t in tests]
    raise DataError(f"tests must be a string of Python or a list of strings, got {type(tests).__name__}",
                    where=where, fix="store each row's tests as a string of asserts or a list of them")


class CodeTestsReward:
    """Reward for Python completions, by the unit tests in the dataset column ``tests_column``.

    The code is :func:`extract_code` of the completion. Tests: see :func:`split_tests`. Reward:
    with ``partial_credit=True`` (default) the fraction of tests passed; with False, 1.0 only when
    every test passes, else 0.0. A timeout gives 0.0; a row without tests gives ``None``.

    Limits per sample: ``timeout_s`` wall-clock (and CPU) seconds for the solution and all of its
    tests together; ``memory_mb`` of address space; files up to ``file_mb``; 64 open files.
    ``workers`` samples run at once.

    After each call ``last_stats`` counts outcomes (:data:`OUTCOMES`): ``passed`` (all tests),
    ``failed``, ``error`` (the solution itself raised and not all tests passed, or the process
    died), ``timeout``, ``memory`` (a ``MemoryError`` was raised), ``no_tests``; and
    ``last_results`` holds one :class:`CodeResult` per sample.

    >>> reward = CodeTestsReward(timeout_s=5)
    >>> reward(["Write add."], ["```python\\ndef add(a, b):\\n    return a + b\\n```"],
    ...        tests=[["assert add(1, 2) == 3", "assert add(0, 0) == 0"]])
    [1.0]
    >>> reward.last_stats["passed"]
    1
    >>> reward.close()
    """

    name = "code"

    def __init__(self, tests_column: str = "tests", timeout_s: float = 5, memory_mb: int = 512,
                 workers: int = 2, partial_credit: bool = True, file_mb: int = 1,
                 python: str = sys.executable):
        if timeout_s <= 0 or memory_mb < 64 or workers < 1 or file_mb < 0:
            raise ConfigError(f"CodeTestsReward needs timeout_s > 0, memory_mb >= 64, workers >= 1, file_mb >= 0; "
                              f"got timeout_s={timeout_s}, memory_mb={memory_mb}, workers={workers}, file_mb={file_mb}",
                              fix="e.g. timeout_s=5, memory_mb=512, workers=2")
        self.tests_column, self.timeout_s, self.memory_mb = tests_column, timeout_s, memory_mb
        self.workers, self.partial_credit, self.file_mb, self.python = workers, partial_credit, file_mb, python
        self.last_stats: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.last_results: list[CodeResult] = []
        # Threads only wait on subprocesses, so a thread pool is enough for parallel runs.
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> CodeTestsReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        check_batch(prompts, completions, self.name)
        rows = get_column(columns, self.tests_column, len(completions), self.name)
        tests = [split_tests(t, where=f"column {self.tests_column!r}, batch row {i}") for i, t in enumerate(rows)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="code-reward")
        self.last_results = list(self._pool.map(self.run_one, [extract_code(c) for c in completions], tests))
        self.last_stats = dict.fromkeys(OUTCOMES, 0)
        rewards: list[float | None] = []
        for r in self.last_results:
            self.last_stats[r.outcome] += 1
            if r.outcome == "no_tests":
                rewards.append(None)
            elif r.outcome == "timeout":
                rewards.append(0.0)
            elif self.partial_credit:
                rewards.append(r.passed / r.total)
            else:
                rewards.append(1.0 if r.passed == r.total else 0.0)
        return rewards

    def run_one(self, code: str, tests: list[tuple[str, bool]]) -> CodeResult:
        """Run ``code`` then ``tests`` (from :func:`split_tests`) in a limited child process."""
        total = sum(is_test for _, is_test in tests)
        if total == 0:
            return CodeResult("no_tests")
        res, why = self._spawn(code, tests)
        if res is None:
            return CodeResult(why[0], 0, total, why[1])
        passed = res["passed"]
        outcome = ("passed" if passed == total else "memory" if res["memory"]
                   else "error" if res.get("solution_failed") else "failed")
        return CodeResult(outcome, passed, total, res["error"])

    def run_script(self, code: str, max_chars: int = 2000) -> str:
        """Run ``code`` under the same limits and return what it printed (the last ``max_chars``
        characters), or ``error: ...`` naming what stopped it: the sandboxed Python tool of
        multi-turn episodes."""
        res, why = self._spawn(code, [], capture=max_chars)
        if res is None:
            return f"error: {why[0]}: {why[1]}"
        out = res.get("stdout", "")
        if not res["error"]:
            return out
        return "\n".join(x for x in (out.rstrip("\n"), f"error: {res['error']}") if x)

    def _spawn(self, code: str, tests: list, capture: int = 0):
        """(the harness's result, None) or (None, (outcome, why)) for one child process."""
        nonce = secrets.token_hex(16)
        payload = {"code": code, "tests": tests, "nonce": nonce, "capture": capture,
                   "memory": self.memory_mb * 2**20, "cpu": int(self.timeout_s) + 1,  # also binds children that escape the group
                   "fsize": self.file_mb * 2**20, "nofile": 64}
        with tempfile.TemporaryDirectory(prefix="posttrain-code-", ignore_cleanup_errors=True) as tmp:
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp,
                   "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            proc = subprocess.Popen([self.python, "-I", "-c", _HARNESS], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp, env=env,
                                    start_new_session=True)  # own process group: one kill stops all
            try:
                out, err = proc.communicate(json.dumps(payload).encode(), timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                return None, ("timeout", f"no result within {self.timeout_s} s")
            finally:
                self._kill_group(proc)  # children the code left behind
        for line in out.decode(errors="replace").splitlines():
            if line.startswith(nonce + " "):
                return json.loads(line[len(nonce) + 1:]), None
        if proc.returncode == -signal.SIGXCPU:
            return None, ("timeout", "CPU time limit")
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return None, ("error", f"exit code {proc.returncode} {tail[0]}"[:500])

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()  # communicate() could block on a pipe a grandchild still holds
        proc.wait()
