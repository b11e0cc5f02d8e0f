"""The two ends of a function test, joined by two pipes (never imported by the package).

``serve`` is the program: the judge writes this file, compiled, into the sandbox's working
directory and runs ``python -I -B driver.pyc IN_FD OUT_FD``. It defines solution.py in a namespace (``__name__ ==
"solution"``, so its main block does not run), announces the names it defines, then answers calls
``{"call": NAME, "args": [...], "kwargs": {...}}`` with ``{"return": VALUE}`` or ``{"raised":
{...}}``, one JSON line each, until its input ends. Nothing it says is trusted.

``check`` is the checker: the sandbox launcher runs it as the program's companion, in a process
of its own (another uid when the sandbox drops privileges; not dumpable, so not traceable and its
/proc entries closed), which the solution's code never runs in. It gets the job (test source,
entry point, a per-run secret) on a descriptor the program never has, runs the test with the
solution's functions as proxies that call ``serve``, and writes the report: one JSON object,
a newline and its MAC under the secret (keyed BLAKE2b). The judge accepts only a report
whose MAC matches, so nothing the program writes anywhere can stand in for it.

Report: status ("ok", "fail": an assertion failed, "error": an exception), and where relevant
error_type, errno, error (traceback tail), actual and expected (reprs, for ``assert A == B``).

Values cross the pipe as plain data (None, bool, int, float, complex, str, bytes, bytearray, list,
tuple, dict, set, frozenset; subclasses travel as their base type); a value of any other type is
refused, so the test only ever compares plain values with the built-in operators. The solution's
names that shadow built-ins are not given to the test. Modules and the names the solution
imported from the standard library are imported by the checker itself.

Modules only one end or only a failure needs are imported where they are used: both ends start
in every function test, so their start-up time is judging time.
"""

import builtins
import json
import os
import sys
import types

MAX_REPR = 2000
MAX_TRACE = 3000
MAX_LINE = 64 << 20
BIG_INT_BITS = 10_000  # above this an int travels in hex (decimal conversion of huge ints is capped)
CONTAINERS = {tuple: "tuple", set: "set", frozenset: "frozenset"}
TAGGED = {v: k for k, v in CONTAINERS.items()}


# ---- values on the wire


def encode(value):
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value) if value.bit_length() <= BIG_INT_BITS else {"t": "int", "v": hex(value)}
    if isinstance(value, (float, str)):
        return float(value) if isinstance(value, float) else str(value)
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"t": "dict", "v": [[encode(k), encode(v)] for k, v in value.items()]}
    for kind, tag in CONTAINERS.items():
        if isinstance(value, kind):
            return {"t": tag, "v": [encode(v) for v in value]}
    if isinstance(value, complex):
        return {"t": "complex", "v": [value.real, value.imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"t": "bytearray" if isinstance(value, bytearray) else "bytes", "v": value.hex()}
    raise TypeError(f"a value of type {type(value).__name__} cannot leave the sandbox (plain data only)")


def decode(obj):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    tag, v = obj["t"], obj["v"]
    if tag == "dict":
        return {decode(k): decode(x) for k, x in v}
    if tag in TAGGED:
        return TAGGED[tag](decode(x) for x in v)
    if tag == "int":
        return int(v, 16)
    if tag == "complex":
        return complex(float(v[0]), float(v[1]))
    if tag in ("bytes", "bytearray"):
        return (bytes if tag == "bytes" else bytearray).fromhex(v)
    raise ValueError(f"unknown value tag {tag!r}")


def trace_of(exc: BaseException, filename: str) -> str:
    """The traceback of ``exc`` through the frames of ``filename`` only (not this file's)."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    text = "".join(
        (["Traceback (most recent call last):\n"] if frames else [])
        + traceback.format_list(frames)
        + traceback.format_exception_only(exc)
    )
    return text[-MAX_TRACE:]


def raised(exc: BaseException) -> dict:
    return {
        "type": type(exc).__name__,
        "message": str(exc)[:MAX_REPR],
        "errno": getattr(exc, "errno", None),
        "trace": trace_of(exc, "solution.py"),
    }


# ---- the program's end


def describe(ns: dict) -> dict:
    """What the test may use of the solution: functions to call, names to import, plain values."""
    calls, imports, values = [], {}, {}
    for name, value in ns.items():
        if name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            imports[name] = [value.__name__, None]
        elif callable(value) and getattr(value, "__module__", None) == "solution":
            calls.append(name)
        elif callable(value):
            imports[name] = [str(getattr(value, "__module__", "")), str(getattr(value, "__qualname__", name))]
            calls.append(name)
        else:
            try:
                values[name] = encode(value)
            except (TypeError, ValueError, RecursionError):
                pass
    return {"calls": calls, "imports": imports, "values": values}


def answer(ns: dict, line: bytes) -> bytes:
    try:
        request = json.loads(line)
        result = ns[request["call"]](*decode(request["args"]), **decode(request["kwargs"]))
        reply = {"return": encode(result)}
        return json.dumps(reply).encode() + b"\n"
    except BaseException as exc:  # the solution's failure is the answer
        return json.dumps({"raised": raised(exc)}).encode() + b"\n"


def serve(in_fd: int, out_fd: int) -> None:
    rx, tx = os.fdopen(in_fd, "rb"), os.fdopen(out_fd, "wb")
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        with open("solution.py") as f:
            exec(compile(f.read(), "solution.py", "exec"), ns)
        hello = json.dumps({"ready": describe(ns)}).encode() + b"\n"
    except BaseException as exc:  # reported to the checker, which decides
        hello = json.dumps({"raised": raised(exc)}).encode() + b"\n"
    tx.write(hello)
    tx.flush()
    for line in rx:
        tx.write(answer(ns, line))
        tx.flush()
    sys.stdout.flush()
    os._exit(0)


# ---- the checker's end


class ProtocolError(Exception):
    """The program broke off or answered something that is not an answer."""


class Channel:
    def __init__(self, in_fd: int, out_fd: int) -> None:
        self.rx, self.tx = os.fdopen(in_fd, "rb"), os.fdopen(out_fd, "wb")

    def receive(self) -> dict:
        line = self.rx.readline(MAX_LINE)
        if not line.endswith(b"\n"):
            raise ProtocolError("the program ended (or sent an over-long line) before answering")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise ProtocolError(f"the program answered something that is not JSON: {line[:200]!r}") from exc
        if not isinstance(message, dict) or len(message) != 1:
            raise ProtocolError(f"malformed answer from the program: {line[:200]!r}")
        return message

    def call(self, name: str, args: tuple, kwargs: dict):
        self.tx.write(json.dumps({"call": name, "args": encode(list(args)), "kwargs": encode(kwargs)}).encode() + b"\n")
        self.tx.flush()
        reply = self.receive()
        if "return" in reply:
            return decode(reply["return"])
        if "raised" in reply:
            raise as_exception(reply["raised"])
        raise ProtocolError(f"malformed answer from the program: {reply!r:.200}")


class SolutionRaised(Exception):
    """An exception of the solution that is not a built-in ``Exception`` (SystemExit, custom ones)."""


def as_exception(info: dict) -> BaseException:
    name, message = str(info.get("type")), str(info.get("message", ""))
    kind = getattr(builtins, name, None)
    exc = None
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            exc = kind(message)
        except Exception:  # a built-in with a fixed signature (UnicodeDecodeError...)
            exc = None
    exc = exc or SolutionRaised(f"{name}: {message}")
    exc.remote = {"type": name, "errno": info.get("errno"), "trace": str(info.get("trace", ""))[-MAX_TRACE:]}
    return exc


def remote(channel: Channel, name: str):
    def call(*args, **kwargs):
        return channel.call(name, args, kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def imported(module: str, attribute: str | None):
    import importlib

    if module.split(".")[0] not in sys.stdlib_module_names:
        raise ImportError(module)
    value = importlib.import_module(module)
    for part in (attribute or "").split(".") if attribute else ():
        value = getattr(value, part)
    return value


class TestGlobals(dict):
    """The test's globals: its own names, and on first use a name of the solution (a proxy, an
    import or a value). Names of built-ins always mean the built-ins."""

    def __init__(self, hello: dict, channel: Channel) -> None:
        super().__init__(__name__="__test__", __builtins__=builtins)
        self.hello, self.channel = hello, channel

    def __missing__(self, name: str):
        if not isinstance(name, str) or hasattr(builtins, name):
            raise KeyError(name)
        if name in self.hello["imports"]:
            try:
                self[name] = imported(*self.hello["imports"][name])
                return self[name]
            except (ImportError, AttributeError, ValueError, TypeError):
                pass  # a function stays a proxy; a module the checker cannot import stays undefined
        if name in self.hello["calls"]:
            self[name] = remote(self.channel, name)
        elif name in self.hello["values"]:
            self[name] = decode(self.hello["values"][name])
        else:
            raise KeyError(name)
        return self[name]


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= MAX_REPR else text[:MAX_REPR] + "..."


def split_assert_eq(source: str):
    """(left, right) expressions of a test that is exactly ``assert left == right``, else None."""
    if not source.lstrip().startswith("assert"):
        return None
    import ast

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


def failure(exc: BaseException, test_source: str) -> dict:
    import linecache  # here, not at start-up: it imports re and tokenize

    linecache.cache["test.py"] = (len(test_source), None, test_source.splitlines(keepends=True), "test.py")
    info = getattr(exc, "remote", {})
    status = "fail" if isinstance(exc, AssertionError) else "error"
    trace = trace_of(exc, "test.py")
    if info.get("trace"):
        called = "Traceback" in trace
        trace = info["trace"] + ("\n(called from the test)\n" + trace if called else "")
    return {
        "status": status,
        "error_type": info.get("type", type(exc).__name__),
        "errno": info.get("errno", getattr(exc, "errno", None)),
        "error": trace[-MAX_TRACE:],
    }


def run_job(job: dict, channel: Channel) -> dict:
    hello = channel.receive()
    if "raised" in hello:
        raise as_exception(hello["raised"])
    ns = TestGlobals(hello["ready"], channel)
    result = run_test(job["test"], ns)
    entry = job.get("entry_point")
    if result["status"] == "ok" and entry:
        try:
            check_function, candidate = ns["check"], ns[entry]
        except KeyError as exc:
            raise NameError(f"{exc.args[0]} is not defined") from None
        check_function(candidate)
    return result


def check(job_bytes: bytes, in_fd: int, out_fd: int, report_fd: int) -> None:
    from _blake2 import blake2b  # hashlib.blake2b, without loading OpenSSL

    job = json.loads(job_bytes)
    try:
        result = run_job(job, Channel(in_fd, out_fd))
    except BaseException as exc:  # whatever went wrong, the test did not pass
        result = failure(exc, job["test"])
    payload = json.dumps(result).encode()
    mac = blake2b(payload, key=bytes.fromhex(job["secret"])).hexdigest().encode()
    with os.fdopen(report_fd, "wb") as report:
        report.write(payload + b"\n" + mac)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
