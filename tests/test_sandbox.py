"""Sandboxed execution: both judging styles, every verdict, and hostile programs contained.

Limits are small (2-3 s, 1 GiB address space, 32 processes, 1 MiB output) so the whole file stays
well under a minute on a busy two-core machine. The fork bomb is bounded (10,000 fork attempts by
one process) and each test checks afterwards that nothing it started is still alive.
"""

import os
import socket
import sys
import uuid

import pytest

from mcl_runtime.agents.judge import FunctionTest, IOTest, Judge, Verdict, outputs_match
from mcl_runtime.agents.sandbox import Limits, Sandbox, SandboxError, current_isolation

LIMITS = Limits(timeout_s=3.0, memory_bytes=1 << 30, max_processes=32, max_file_bytes=1 << 20)
ISO = current_isolation()
needs_namespaces = pytest.mark.skipif(not ISO.namespaces, reason="needs pid/net namespaces (root on Linux)")
needs_readonly_root = pytest.mark.skipif(not ISO.readonly_root, reason="needs a read-only root (root on Linux)")


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS)


@pytest.fixture(scope="module")
def judge(sandbox):
    return Judge(sandbox)


def run_script(judge, code, stdin="", expected=""):
    return judge.run_test(code, IOTest(stdin, expected))


def processes_with(token: str) -> list[int]:
    """Host processes whose command line contains ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def test_isolation_in_effect_is_reported():
    text = ISO.describe()
    assert "rlimits" in text and "empty env" in text
    if sys.platform == "linux" and os.geteuid() == 0:
        assert ISO.uid_drop, text


# ---- function-level judging (definition + test [+ check(entry_point)])

SQUARE_OK = "def square(x):\n    return x * x\n"
SQUARE_BAD = "def square(x):\n    return x + x\n"
CHECK = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n"


def test_function_style_correct_passes(judge):
    assert judge.run_test(SQUARE_OK, FunctionTest("assert square(4) == 16")).verdict is Verdict.PASSED
    assert judge.run_test(SQUARE_OK, FunctionTest(CHECK, entry_point="square")).verdict is Verdict.PASSED


def test_function_style_wrong_fails_with_values(judge):
    out = judge.run_test(SQUARE_BAD, FunctionTest("assert square(3) == 9"))
    assert out.verdict is Verdict.WRONG_ANSWER
    assert (out.actual, out.expected) == ("6", "9")
    assert judge.run_test(SQUARE_BAD, FunctionTest(CHECK, entry_point="square")).verdict is Verdict.WRONG_ANSWER


def test_function_style_errors(judge):
    crash = judge.run_test("def square(x):\n    return 1 / 0\n", FunctionTest("assert square(1) == 1"))
    assert crash.verdict is Verdict.RUNTIME_ERROR and "ZeroDivisionError" in crash.error
    assert (
        judge.run_test("def square(x) return", FunctionTest("assert square(1) == 1")).verdict is Verdict.RUNTIME_ERROR
    )
    missing = judge.run_test(SQUARE_OK, FunctionTest(CHECK, entry_point="cube"))
    assert missing.verdict is Verdict.RUNTIME_ERROR


def test_function_style_main_block_does_not_run_and_early_exit_is_no_pass(judge):
    main_block = SQUARE_OK + "if __name__ == '__main__':\n    input()\n"
    assert judge.run_test(main_block, FunctionTest("assert square(2) == 4")).verdict is Verdict.PASSED
    for escape in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "exit()\n"):
        out = judge.run_test(SQUARE_OK + escape, FunctionTest("assert square(2) == 4"))
        assert out.verdict is Verdict.RUNTIME_ERROR, escape


# ---- forged verdicts: the solution cannot make a wrong answer pass

FAKE_REPORT = '{"status": "ok"}'
FORGERIES = {
    "write to argv descriptors": "import os, sys\nfor a in sys.argv[1:]:\n    try:\n"
    f"        os.write(int(a), b'{FAKE_REPORT}\\n')\n    except (OSError, ValueError):\n"
    "        pass\nos._exit(0)\n",
    "write to every descriptor": "import os\nfor fd in range(64):\n    try:\n"
    f"        os.write(fd, b'{FAKE_REPORT}\\n' + b'0' * 128)\n    except OSError:\n"
    "        pass\nos._exit(0)\n",
    "fake hello then exit": 'import os, sys\nos.write(int(sys.argv[2]), b\'{"ready": {"calls": [], '
    '"imports": {}, "values": {"check": 0}}}\\n\')\nos._exit(0)\n',
    "look-alike report on stdout and stderr": f"import sys\nprint('{FAKE_REPORT}')\n"
    f"print('{FAKE_REPORT}', file=sys.stderr)\n",
    "overwrite the report file": "import os\nfor p in ('../report', 'report'):\n    try:\n"
    f"        open(p, 'w').write('{FAKE_REPORT}\\n' + '0' * 128)\n    except OSError:\n"
    "        pass\n",
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "SystemExit in atexit": "import atexit\ndef bye():\n    raise SystemExit(0)\natexit.register(bye)\n",
    "os._exit in atexit": "import atexit, os\natexit.register(os._exit, 0)\n",
    "patch builtins": "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.AssertionError = type('A', (), {})\n"
    "builtins.isinstance = lambda *a: True\n",
    "shadow a builtin": "def abs(x):\n    return 0\n",
    "monkeypatch the checker": "import __main__, sys\nfor m in list(sys.modules.values()):\n"
    "    for name in ('check', 'run_test', 'run_job', 'failure', 'split_assert_eq'):\n"
    "        if hasattr(m, name):\n            try:\n"
    "                setattr(m, name, lambda *a, **k: {'status': 'ok'})\n"
    "            except (AttributeError, TypeError):\n                pass\n",
    "always-equal result": "class Eq:\n    def __eq__(self, other):\n        return True\n"
    "def square(x):\n    return Eq()\n",
    "always-equal int subclass": "class I(int):\n    def __eq__(self, other):\n        return True\n"
    "    __hash__ = int.__hash__\ndef square(x):\n    return I(0)\n",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
}
OTHER_PROCESSES_FORGERY = (
    "import os\nfor pid in os.listdir('/proc'):\n"
    "    if not pid.isdigit() or int(pid) == os.getpid():\n        continue\n"
    "    try:\n        fds = os.listdir(f'/proc/{pid}/fd')\n    except OSError:\n        continue\n"
    "    for fd in fds:\n        try:\n            with open(f'/proc/{pid}/fd/{fd}', 'w') as f:\n"
    f"                f.write('{FAKE_REPORT}\\n')\n        except OSError:\n            pass\n"
)
FORGED_TESTS = [
    FunctionTest(CHECK, entry_point="square"),
    FunctionTest("assert square(3) == 9"),
    FunctionTest("assert abs(square(3) - 9) < 1e-9"),
]


@pytest.fixture(scope="module", params=["auto", "basic"])
def any_judge(request):
    """Both isolations. Under "basic" the program runs as this user (root here, maybe), so every
    forgery above touches only the run's own descriptors and files."""
    return Judge(Sandbox(LIMITS, isolation=request.param))


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_verdicts_fail(any_judge, name):
    program = SQUARE_BAD + FORGERIES[name]
    for test in FORGED_TESTS:
        out = any_judge.run_test(program, test)
        assert out.verdict is not Verdict.PASSED, (name, test.source)


@needs_namespaces  # only the run's own processes are visible: never run this without a pid namespace
def test_writing_into_other_processes_descriptors_does_not_forge(judge):
    for test in FORGED_TESTS:
        assert judge.run_test(SQUARE_BAD + OTHER_PROCESSES_FORGERY, test).verdict is not Verdict.PASSED


@needs_namespaces  # reads other processes' /proc entries: only inside the run's own pid namespace
def test_the_checker_is_another_uid_and_the_test_is_out_of_reach(judge):
    marker = f"hidden-{uuid.uuid4().hex}"
    program = """
import glob, os
def who():
    return os.getuid()
def leak(marker):
    paths = glob.glob('/proc/[0-9]*/*') + glob.glob('/proc/[0-9]*/fd/*') + glob.glob('../*') + glob.glob('*')
    for path in paths:
        if path.startswith(f'/proc/{os.getpid()}/'):
            continue  # its own pipes (reading them would block) and memory
        try:
            with open(path, 'rb') as f:
                if marker.encode() in f.read(1 << 20):
                    return path
        except OSError:
            pass
    return None
"""
    test = f"import os\nassert who() != os.getuid()\nassert leak('{marker[:7]}' + '{marker[7:]}') is None\n"
    out = judge.run_test(program, FunctionTest(test))
    assert out.verdict is Verdict.PASSED, out.error


def test_correct_solution_still_passes_next_to_look_alikes(any_judge):
    program = SQUARE_OK + FORGERIES["look-alike report on stdout and stderr"]
    assert all(any_judge.run_test(program, t).passed for t in FORGED_TESTS)


def test_solution_names_and_values_reach_the_test(judge):
    program = (
        "import math\nfrom math import sqrt\nLIMIT = (3, {'a': [1.5, None]})\n"
        "def helper(x):\n    return {x: (x, x + 0.5), 'z': {1, 2}, 'b': b'hi', 'c': 1j}\n"
        "def boom():\n    raise ValueError('bad')\ndef same(x):\n    return x\n"
    )
    test = (
        "assert helper(2) == {2: (2, 2.5), 'z': {1, 2}, 'b': b'hi', 'c': 1j}\n"
        "assert LIMIT == (3, {'a': [1.5, None]}) and math.sqrt(4) == sqrt(4) == 2\n"
        "assert same(10**5000) == 10**5000 and same(x=float('inf')) == float('inf')\n"
        "try:\n    boom()\nexcept ValueError as e:\n    assert 'bad' in str(e)\nelse:\n    assert False\n"
    )
    out = judge.run_test(program, FunctionTest(test))
    assert out.verdict is Verdict.PASSED, out.error


# ---- stdin/stdout judging

DOUBLE_OK = "n = int(input())\nprint(n * 2)\n"
DOUBLE_BAD = "n = int(input())\nprint(n * 3)\n"


def test_stdio_correct_passes_wrong_fails(judge):
    assert run_script(judge, DOUBLE_OK, "21\n", "42\n").verdict is Verdict.PASSED
    wrong = run_script(judge, DOUBLE_BAD, "21\n", "42\n")
    assert wrong.verdict is Verdict.WRONG_ANSWER and wrong.actual == "63\n"


def test_stdio_whitespace_tolerant(judge):
    prog = "import sys\na = sys.stdin.read().split()\nprint(' '.join(a) + '   ')\nprint()\nsys.exit(0)\n"
    assert run_script(judge, prog, "1 2\n3", "1  2 3").verdict is Verdict.PASSED
    assert outputs_match("1 \r\n2 \n\n", "1\n2") and not outputs_match("12", "1 2")


def test_stdio_numbers_within_tolerance_pass(judge):
    assert run_script(judge, "print(1 / 3)\nprint(4.0)\n", "", "0.333333333\n4").verdict is Verdict.PASSED
    assert judge.run_test("print(0.3334)\n", IOTest("", "0.333333333", tolerance=1e-6)).verdict is Verdict.WRONG_ANSWER


def test_stdio_exit_status_is_runtime_error(judge):
    assert run_script(judge, "import sys\nprint(42)\nsys.exit(3)\n", "", "42").verdict is Verdict.RUNTIME_ERROR


# ---- limits and hostile programs


def test_infinite_loop_times_out(judge):
    out = run_script(judge, "while True:\n    pass\n")
    assert out.verdict is Verdict.TIMEOUT and out.seconds < LIMITS.timeout_s + 2


def test_cpu_limit_below_the_wall_clock_is_a_timeout():
    cpu_bound = Judge(Sandbox(Limits(timeout_s=10, cpu_s=1, memory_bytes=1 << 30, max_file_bytes=1 << 20)))
    ignores_xcpu = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n"
    out = cpu_bound.run_test(ignores_xcpu, IOTest("", ""))
    assert out.verdict is Verdict.TIMEOUT and out.seconds < 8


def test_sleeping_program_times_out(judge):
    assert run_script(judge, "import time\ntime.sleep(60)\n").verdict is Verdict.TIMEOUT


def test_allocating_8gb_is_a_memory_limit(judge):
    out = run_script(judge, "x = bytearray(8 * 2**30)\nprint(len(x))\n")
    assert out.verdict is Verdict.MEMORY_LIMIT
    fn = judge.run_test("def f():\n    return [0] * (2**31)\n", FunctionTest("assert len(f()) == 2**31"))
    assert fn.verdict is Verdict.MEMORY_LIMIT


def test_100mb_of_output_is_an_output_limit(judge):
    out = run_script(judge, "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2**20)\n")
    assert out.verdict is Verdict.OUTPUT_LIMIT
    assert len(out.actual) < 10_000
    err = run_script(judge, "import sys\nsys.stderr.write('e' * 100 * 2**20)\n")
    assert err.verdict is Verdict.OUTPUT_LIMIT


def test_deep_recursion_is_a_runtime_error(judge):
    out = run_script(judge, "def f(n):\n    return f(n + 1)\nf(0)\n")
    assert out.verdict is Verdict.RUNTIME_ERROR and "RecursionError" in out.error
    deeper = (
        "import sys\nsys.setrecursionlimit(10**9)\nimport json\n"
        "x = []\nfor _ in range(10**6):\n    x = [x]\nprint(len(json.dumps(x)))\n"
    )
    assert run_script(judge, deeper).verdict in (Verdict.RUNTIME_ERROR, Verdict.MEMORY_LIMIT)


def test_fork_bomb_is_contained_and_cleaned_up(judge):
    token = f"4242.{uuid.uuid4().int % 10**6}"
    bomb = f"""
import os
forks = failures = 0
for _ in range(10000):
    try:
        pid = os.fork()
    except OSError:
        failures += 1
        continue
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "{token}"])
    forks += 1
print(forks, failures)
"""
    out = run_script(judge, bomb)
    forks, failures = map(int, out.actual.split())
    assert forks < LIMITS.max_processes and failures > 0
    assert processes_with(token) == []


def test_child_left_sleeping_is_killed(judge):
    token = f"4343.{uuid.uuid4().int % 10**6}"
    prog = f"""
import os, subprocess
subprocess.Popen(["/bin/sleep", "{token}"])
if os.fork() == 0:
    os.execv("/bin/sleep", ["sleep", "{token}"])
print("bye")
"""
    assert run_script(judge, prog, "", "bye").verdict is Verdict.PASSED
    assert processes_with(token) == []


@needs_namespaces
def test_child_that_leaves_the_session_is_killed(judge):
    token = f"4444.{uuid.uuid4().int % 10**6}"
    prog = f"""
import os
if os.fork() == 0:
    os.setsid()
    os.execv("/bin/sleep", ["sleep", "{token}"])
print("bye")
"""
    assert run_script(judge, prog, "", "bye").verdict is Verdict.PASSED
    assert processes_with(token) == []


def test_killing_the_parent_does_not_reach_the_caller(judge):
    prog = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGTERM)\n"
    out = run_script(judge, prog)
    assert out.verdict in (Verdict.PASSED, Verdict.RUNTIME_ERROR, Verdict.WRONG_ANSWER)
    os.kill(os.getpid(), 0)  # still here
    assert judge.run_test(SQUARE_OK, FunctionTest("assert square(2) == 4")).verdict is Verdict.PASSED


def test_parent_secrets_are_not_visible(judge, monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("MCL_TEST_SECRET", secret)
    prog = """
import os
print(os.environ.get("MCL_TEST_SECRET"))
print(sorted(os.environ))
for pid in os.listdir("/proc"):
    try:
        print(open(f"/proc/{pid}/environ", "rb").read())
    except OSError:
        pass
"""
    out = run_script(judge, prog)
    assert out.verdict is Verdict.WRONG_ANSWER
    assert secret not in out.actual and secret not in out.error
    assert "None" in out.actual


def test_writes_outside_the_workdir_fail_and_the_workdir_is_removed(judge, tmp_path):
    tmp_path.chmod(0o777)
    targets = [tmp_path / "escaped.txt", f"/tmp/mcl-escaped-{uuid.uuid4().hex}", "../escaped.txt"]
    if os.geteuid() == 0:
        targets.append(f"/root/mcl-escaped-{uuid.uuid4().hex}")
    prog = f"""
import os
print(os.getcwd())
open("inside.txt", "w").write("fine")
for path in {[str(t) for t in targets]!r}:
    try:
        open(path, "w").write("escaped")
        print("WROTE", path)
    except OSError as exc:
        print("refused", path, type(exc).__name__)
"""
    out = run_script(judge, prog)
    workdir = out.actual.splitlines()[0]
    assert not os.path.exists(workdir)
    if ISO.readonly_root:
        assert "WROTE" not in out.actual, out.actual
        assert not (tmp_path / "escaped.txt").exists() and not os.path.exists(targets[1])
    elif ISO.uid_drop:
        assert f"WROTE {targets[-1]}" not in out.actual


@needs_readonly_root
def test_file_size_limit_inside_the_workdir(judge):
    out = run_script(judge, "open('big', 'wb').write(b'x' * (2 * 2**20))\n")
    assert out.verdict is Verdict.OUTPUT_LIMIT


@needs_namespaces
def test_no_network(judge):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    prog = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=1)
    print("connected")
except OSError as exc:
    print("blocked", exc)
"""
    try:
        out = run_script(judge, prog)
    finally:
        server.close()
    assert out.actual.startswith("blocked"), out.actual


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        Limits(timeout_s=0)
    with pytest.raises(ValueError):
        Sandbox(LIMITS, isolation="none")
    with pytest.raises(ValueError):
        Sandbox(LIMITS).run({"../x.py": "print(1)"}, ["x.py"])
    with pytest.raises(TypeError):
        Judge(Sandbox(LIMITS)).run_test("print(1)", "not a test")


def test_basic_isolation_still_judges_and_survives_parent_kill():
    basic = Judge(Sandbox(LIMITS, isolation="basic"))
    assert not basic.sandbox.isolation.namespaces
    assert basic.run_test(DOUBLE_OK, IOTest("2", "4")).verdict is Verdict.PASSED
    assert basic.run_test("while True: pass", IOTest("", "")).verdict is Verdict.TIMEOUT
    basic.run_test("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", IOTest("", ""))
    os.kill(os.getpid(), 0)


def test_strict_isolation_is_refused_or_given():
    if ISO.namespaces and ISO.readonly_root and ISO.uid_drop:
        assert Sandbox(LIMITS, isolation="strict").isolation == ISO
    else:
        with pytest.raises(SandboxError):
            Sandbox(LIMITS, isolation="strict")


def test_signal_verdicts(judge):
    for prog in ("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n", "import ctypes\nctypes.string_at(0)\n"):
        assert run_script(judge, prog).verdict is Verdict.RUNTIME_ERROR, prog
