"""Judging programs in the sandbox, in the two styles the benchmarks use.

- ``FunctionTest``: the program defines functions; the test is Python source run after it
  (``assert f(1) == 2``, or a ``check`` function with ``entry_point`` naming what to pass to it).
- ``IOTest``: the program reads stdin and writes stdout, compared with the expected output by
  ``outputs_match``, which follows APPS's checker (``eval/testing_util.py``, standard-input
  problems); see its docstring for the rules and for where we are stricter than APPS.

Each test runs in its own sandbox run and gets one of the ``Verdict`` values.

Nothing the solution does can forge a verdict. A stdin/stdout program is run as it is: the judge
compares its stdout and looks at how it ended. For a function test the solution runs in the
program process, ``sandbox_driver.serve`` (shipped compiled), which only answers calls; the test itself runs in the
sandbox's companion (``sandbox_driver.check``): another process, under another uid where the
sandbox drops privileges, holding the report descriptor and a per-run secret that the program
never has. The report counts only with a valid MAC under that secret, so exiting early, writing
to inherited descriptors, printing look-alike reports, patching builtins or the checker inside
the solution's process, or raising in atexit all end as failures. (Under ``basic`` isolation the
program runs as the caller's own user, which the kernel may let it trace: the guarantee needs the
uid drop, i.e. root on Linux.)
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import importlib.util
import json
import marshal
import os
import signal
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from mcl_runtime.agents.sandbox import Companion, Limits, RunResult, Sandbox

DRIVER = Path(__file__).with_name("sandbox_driver.py")
DRIVER_CODE = compile(DRIVER.read_text(), str(DRIVER), "exec")
# the program side runs it as a .pyc (unchecked hash-based), so no run pays for compiling it
DRIVER_PYC = (
    importlib.util.MAGIC_NUMBER
    + (1).to_bytes(4, "little")
    + importlib.util.source_hash(DRIVER.read_bytes())
    + marshal.dumps(DRIVER_CODE)
)
MAX_FIELD = 4000
EFBIG_TEXT = f"[Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}"


class Verdict(str, Enum):  # noqa: UP042 (str() keeps the member name; StrEnum would change it)
    PASSED = "passed"
    WRONG_ANSWER = "wrong answer"
    RUNTIME_ERROR = "runtime error"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory limit"
    OUTPUT_LIMIT = "output limit"


@dataclass(frozen=True)
class FunctionTest:
    source: str
    entry_point: str | None = None  # when set, ``check(entry_point)`` runs after ``source``


@dataclass(frozen=True)
class IOTest:
    input: str
    expected: str
    tolerance: float | None = None  # absolute-or-relative error the statement allows (see outputs_match)


Test = FunctionTest | IOTest


@dataclass
class TestOutcome:
    verdict: Verdict
    input: str  # the test's source (function style) or its stdin
    expected: str
    actual: str  # the value computed (function style) or the stdout
    error: str  # traceback or stderr tail; empty when none
    seconds: float

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASSED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d


APPS_RTOL, APPS_ATOL = 1e-5, 1e-8  # numpy.allclose's defaults, which APPS's checker calls
APPS_ROUND_DIGITS = 3  # APPS's last check: numbers rounded to 3 decimals


def outputs_match(actual: str, expected: str, tolerance: float | None = None) -> bool:
    """Whether stdout ``actual`` is a right answer for ``expected``, as APPS's checker judges.

    Line structure as APPS treats it: both sides are cut into lines, each line stripped, empty
    lines dropped; the lines must then correspond one to one. Within a line, tokens (runs of
    non-whitespace) correspond one to one, and a pair matches when the strings are equal or,
    if both parse as Python floats, when the numbers are close:
      - ``tolerance`` None (APPS): ``|a - b| <= 1e-8 + 1e-5 * |b|`` (``np.allclose``, which APPS
        applies to outputs whose every line is one number), or equal after rounding to 3
        decimals (APPS's last check, on outputs whose every token is a number);
      - ``tolerance`` t (the statement allows an absolute or relative error t, as xCodeEval's
        Codeforces checkers do): ``|a - b| <= t * max(1, |b|)``; APPS's rules do not apply.
    So ``4.0`` matches ``4``, ``0.3333333`` matches ``0.333333333``, and ``1  2 `` matches
    ``1 2``, as in APPS; ``1 2`` does not match ``1\n2`` and ``YES`` does not match ``yes``,
    as in APPS. Stricter than APPS by design: APPS's later checks compare each line's tokens
    and the lines as sets (order and repeats ignored, ``2 1`` passes for ``1 2``); here order
    and count matter. Numbers are compared per token wherever they appear, where APPS only
    tries a numeric comparison when the whole output is numeric.
    """
    got, want = _lines(actual), _lines(expected)
    return len(got) == len(want) and all(
        len(g) == len(w) and all(_tokens_match(a, b, tolerance) for a, b in zip(g, w)) for g, w in zip(got, want)
    )


def _lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def _tokens_match(actual: str, expected: str, tolerance: float | None) -> bool:
    if actual == expected:
        return True
    try:
        a, b = float(actual), float(expected)
    except ValueError:
        return False
    if tolerance is not None:
        return abs(a - b) <= tolerance * max(1.0, abs(b))
    if abs(a - b) <= APPS_ATOL + APPS_RTOL * abs(b):
        return True
    try:
        return round(a, APPS_ROUND_DIGITS) == round(b, APPS_ROUND_DIGITS)
    except OverflowError:  # inf or nan, already compared above
        return False


def _clip(text: str, limit: int = MAX_FIELD) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def _parse_report(run: RunResult, secret: bytes) -> dict | None:
    """The companion's report, if its MAC under this run's secret is valid."""
    payload, _, mac = run.report.rpartition(b"\n")
    if not hmac.compare_digest(hashlib.blake2b(payload, key=secret).hexdigest().encode(), mac):
        return None
    report = json.loads(payload)
    return report if isinstance(report, dict) and "status" in report else None


def classify(run: RunResult, report: dict | None, limits: Limits) -> Verdict | None:
    """The verdict of a run that did not finish normally, or None when it did."""
    killed_for_cpu = run.signal == signal.SIGKILL and run.cpu_seconds >= limits.cpu_seconds
    if run.timed_out or run.signal == signal.SIGXCPU or killed_for_cpu:
        return Verdict.TIMEOUT
    efbig = (bool(report) and report.get("errno") == errno.EFBIG) or EFBIG_TEXT in run.stderr[-2000:]
    if run.output_exceeded or run.signal == signal.SIGXFSZ or efbig:
        return Verdict.OUTPUT_LIMIT
    if (report or {}).get("error_type") == "MemoryError" or "MemoryError" in run.stderr[-2000:]:
        return Verdict.MEMORY_LIMIT
    if run.signal is not None or run.exit_code != 0 or (report or {}).get("status") == "error":
        return Verdict.RUNTIME_ERROR
    return None


class Judge:
    """Runs tests against a program source in a ``Sandbox``."""

    def __init__(self, sandbox: Sandbox | None = None) -> None:
        self.sandbox = sandbox or Sandbox()

    def run_test(self, program: str, test: Test, limits: Limits | None = None) -> TestOutcome:
        limits = limits or self.sandbox.limits
        if isinstance(test, IOTest):
            run = self.sandbox.run({"solution.py": program}, ["solution.py"], test.input, limits)
            return _outcome(test, run, None, limits)
        if not isinstance(test, FunctionTest):
            raise TypeError(f"expected a FunctionTest or IOTest, got {type(test).__name__}")
        secret = os.urandom(32)
        job = json.dumps({"test": test.source, "entry_point": test.entry_point, "secret": secret.hex()})
        run = self.sandbox.run(
            {"solution.py": program, "driver.pyc": DRIVER_PYC},
            ["driver.pyc", "{from_companion}", "{to_companion}"],
            "",
            limits,
            Companion(DRIVER_CODE, "check", job.encode()),
        )
        return _outcome(test, run, _parse_report(run, secret), limits)

    def run_tests(
        self, program: str, tests: list[Test], stop_on_failure: bool = False, limits: Limits | None = None
    ) -> list[TestOutcome]:
        outcomes = []
        for test in tests:
            outcomes.append(self.run_test(program, test, limits))
            if stop_on_failure and not outcomes[-1].passed:
                break
        return outcomes

    async def arun_tests(
        self, program: str, tests: list[Test], stop_on_failure: bool = False, limits: Limits | None = None
    ) -> list[TestOutcome]:
        return await asyncio.to_thread(self.run_tests, program, tests, stop_on_failure, limits)


def _outcome(test: Test, run: RunResult, report: dict | None, limits: Limits) -> TestOutcome:
    verdict = classify(run, report, limits)
    error = (report or {}).get("error") or run.stderr[-MAX_FIELD:]
    if isinstance(test, IOTest):
        if verdict is None:
            verdict = (
                Verdict.PASSED if outputs_match(run.stdout, test.expected, test.tolerance) else Verdict.WRONG_ANSWER
            )
        return TestOutcome(
            verdict, _clip(test.input), _clip(test.expected), _clip(run.stdout), _clip(error), run.seconds
        )
    if verdict is None:
        verdict = _function_verdict(report)
        if verdict is Verdict.RUNTIME_ERROR and report is None:
            error = "the test did not report (the checker was killed or its report was not authentic)\n" + error
    return TestOutcome(
        verdict,
        _clip(test.source),
        (report or {}).get("expected", ""),
        (report or {}).get("actual", ""),
        _clip(error),
        run.seconds,
    )


def _function_verdict(report: dict | None) -> Verdict:
    status = (report or {}).get("status")
    if status == "ok":
        return Verdict.PASSED
    return Verdict.WRONG_ANSWER if status == "fail" else Verdict.RUNTIME_ERROR
