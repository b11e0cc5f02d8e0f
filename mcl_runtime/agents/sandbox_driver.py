"""Runs inside the sandbox next to the program: ``python -I -B driver.py REPORT_FD job.json``.

The judge copies this file's text into the working directory; it is never imported by the package.
job.json: {"mode": "script"} runs solution.py as __main__ (a stdin/stdout program);
{"mode": "function", "test": SOURCE, "entry_point": NAME or null} defines solution.py in a
namespace (its ``if __name__ == "__main__":`` block does not run), then runs SOURCE in it and, if
NAME is given, ``check(NAME)``. A test that is a single ``assert A == B`` is evaluated in parts so
the report carries A's and B's values.

The report written to REPORT_FD is one JSON object: status ("ok", "fail": an assertion failed,
"error": an exception), and where relevant error_type, errno, error (traceback tail), actual,
expected (reprs). A program that ends the interpreter itself (os._exit) leaves no report.
"""
import ast
import json
import os
import runpy
import sys
import traceback

MAX_REPR = 2000
MAX_TRACE = 3000


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= MAX_REPR else text[:MAX_REPR] + "..."


def failure(exc: BaseException) -> dict:
    status = "fail" if isinstance(exc, AssertionError) else "error"
    trace = "".join(traceback.format_exception(exc))
    return {"status": status, "error_type": type(exc).__name__, "errno": getattr(exc, "errno", None),
            "error": trace[-MAX_TRACE:]}


def run_script() -> dict:
    sys.argv = ["solution.py"]
    try:
        runpy.run_path("solution.py", run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            return {"status": "error", "error_type": "SystemExit", "error": f"exit status {exc.code!r}"}
    return {"status": "ok"}


def split_assert_eq(source: str):
    """(left, right) expressions of a test that is exactly ``assert left == right``, else None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    test = tree.body[0].test
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        return ast.Expression(test.left), ast.Expression(test.comparators[0])
    return None


def run_test(source: str, ns: dict) -> dict:
    parts = split_assert_eq(source)
    if parts is None:
        exec(compile(source, "test.py", "exec"), ns)
        return {"status": "ok"}
    actual = eval(compile(parts[0], "test.py", "eval"), ns)
    expected = eval(compile(parts[1], "test.py", "eval"), ns)
    status = "ok" if actual == expected else "fail"
    return {"status": status, "actual": short_repr(actual), "expected": short_repr(expected)}


def run_function(job: dict) -> dict:
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    with open("solution.py") as f:
        exec(compile(f.read(), "solution.py", "exec"), ns)
    result = run_test(job["test"], ns)
    if result["status"] == "ok" and job.get("entry_point"):
        if "check" not in ns or job["entry_point"] not in ns:
            raise NameError(f"check or {job['entry_point']} is not defined")
        ns["check"](ns[job["entry_point"]])
    return result


def main() -> None:
    report_fd = int(sys.argv[1])
    os.set_inheritable(report_fd, False)
    with open(sys.argv[2]) as f:
        job = json.load(f)
    try:
        result = run_script() if job["mode"] == "script" else run_function(job)
    except BaseException as exc:  # the program's failure is the result being reported
        result = failure(exc)
    try:
        sys.stdout.flush()
    except OSError as exc:
        result = failure(exc)
    os.write(report_fd, json.dumps(result).encode())
    os._exit(1 if result["status"] == "error" else 0)


if __name__ == "__main__":
    main()
