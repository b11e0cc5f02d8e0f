"""Run untrusted Python programs in an isolated child process.

Every run gets, whatever the platform:
  - a child in a new session (its process group is SIGKILLed when the run ends or times out);
  - setrlimit on CPU seconds, address space, processes, file size (which also caps stdout and
    stderr, written to files) and open files; no core dumps;
  - a wall-clock timeout; an empty environment; a temporary working directory removed afterwards;
  - ``python -I -B`` (isolated mode: no user site, no PYTHON* variables, no cwd on sys.path);
  - a launcher process between the parent and the program, so the program's parent is never the
    caller (``os.kill(os.getppid(), ...)`` cannot reach it).

When running as root on Linux, and as far as the kernel allows (probed once, see ``current_isolation()``):
  - the program runs as a fresh unprivileged uid (no capabilities, no access to root's files or
    processes; RLIMIT_NPROC is enforced for it);
  - new pid, mount, network, ipc and uts namespaces: no network at all (not even loopback),
    no other process visible, and every descendant dies when the program exits;
  - every mount read-only except the working directory;
  - a pids cgroup (v1 or v2) with ``pids.max``; all its members are killed when the run ends.
Without root only the first list applies, so the network stays reachable, RLIMIT_NPROC counts all
of the user's processes, and a process that leaves the session can outlive the run.

A run may have a ``Companion``: trusted code in a second child, under another unprivileged uid,
not dumpable, joined to the program by two pipes and alone holding a report descriptor; the
judge runs function tests there so that the solution never shares a process with its verdict.
"""

from __future__ import annotations

import json
import marshal
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
SETUP_ERROR = "mcl-sandbox-setup-error:"
UID_BASE, UID_SPAN = 1_500_000_000, 400_000_000


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program it ran)."""


PIPE_PLACEHOLDERS = ("{from_companion}", "{to_companion}")


@dataclass(frozen=True)
class Companion:
    """Trusted code that runs next to the program, never in the program's process.

    The launcher reads ``code`` and ``job`` (on a descriptor the program never holds) and runs
    ``code`` before the program starts, then forks a second child that drops to an unprivileged uid other
    than the program's, makes itself not dumpable, and calls ``function(job, from_program_fd,
    to_program_fd, report_fd)``. The two pipes join it to the program; ``report_fd`` is its alone.
    """

    code: types.CodeType  # a module defining ``function``, compiled by this interpreter
    function: str
    job: bytes


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    cpu_s: int | None = None  # default: ceil(timeout_s)
    memory_bytes: int = 2 << 30  # address space
    max_processes: int = 64
    max_file_bytes: int = 16 << 20  # any file the program writes, stdout and stderr included
    max_open_files: int = 64

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_bytes <= 0 or self.max_processes <= 0:
            raise ValueError(f"sandbox limits must be positive: {self}")
        if self.max_file_bytes <= 0 or self.max_open_files < 8:
            raise ValueError(f"max_file_bytes must be positive and max_open_files at least 8: {self}")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else max(1, int(-(-self.timeout_s // 1)))


@dataclass(frozen=True)
class Isolation:
    """Which mechanisms are in effect (see the module docstring)."""

    uid_drop: bool = False
    namespaces: bool = False
    readonly_root: bool = False
    pids_cgroup: str | None = None  # the cgroup root directory used
    python: str = os.path.realpath(sys.executable)

    def describe(self) -> str:
        parts = ["session + process-group kill", "rlimits", "empty env", "temp workdir", "python -I"]
        if self.uid_drop:
            parts.append("unprivileged uid")
        if self.namespaces:
            parts.append("pid/mount/net/ipc/uts namespaces (no network)")
        if self.readonly_root:
            parts.append("read-only filesystem except workdir")
        if self.pids_cgroup:
            parts.append(f"pids cgroup ({self.pids_cgroup})")
        return ", ".join(parts)


@dataclass
class RunResult:
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    timed_out: bool
    output_exceeded: bool  # stdout or stderr reached max_file_bytes
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float
    report: bytes = b""  # what the companion wrote on its report fd (see run())

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("report")
        return d


@dataclass
class _Paths:
    root: Path
    work: Path
    stage: Path
    stdin: Path
    stdout: Path
    stderr: Path
    report: Path


class _PidsCgroup:
    """One pids cgroup per run: a bound on the processes and a handle to kill all of them."""

    def __init__(self, base: str, max_pids: int) -> None:
        self.path = Path(base) / f"mcl-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        (self.path / "pids.max").write_text(str(max_pids))

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def members(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kill_all_and_remove(self, patience_s: float = 5.0) -> None:
        deadline = time.monotonic() + patience_s
        while time.monotonic() < deadline:
            pids = self.members()
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            if not pids:
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    pass
            time.sleep(0.01)
        raise SandboxError(f"could not empty and remove the cgroup {self.path}")


def _find_pids_cgroup_base() -> str | None:
    """A cgroup directory (v1 pids hierarchy or v2 root with the pids controller) we may create children in."""
    try:
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return None
    for _dev, mnt, fstype, opts, *_ in mounts:
        if fstype == "cgroup" and "pids" in opts.split(","):
            return mnt
    for _dev, mnt, fstype, *_ in mounts:
        if fstype == "cgroup2" and _enable_v2_pids(Path(mnt)):
            return mnt
    return None


def _remove_stale_cgroups(base: Path) -> None:
    """Empty cgroups left by processes that died before cleaning up (named after their pid)."""
    for path in base.glob("mcl-sandbox-*-*"):
        owner = path.name.split("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            try:
                path.rmdir()
            except OSError:
                pass


def _enable_v2_pids(root: Path) -> bool:
    try:
        if "pids" not in (root / "cgroup.controllers").read_text().split():
            return False
        if "pids" not in (root / "cgroup.subtree_control").read_text().split():
            (root / "cgroup.subtree_control").write_text("+pids")
        return True
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _user_process_count() -> int:
    uid, n = os.getuid(), 0
    for entry in os.scandir("/proc"):
        try:
            n += entry.name.isdigit() and entry.stat().st_uid == uid
        except OSError:
            pass
    return n


def _interpreter() -> str:
    return os.path.realpath(sys.executable)


def _exposed_dirs(iso: Isolation) -> list[str]:
    """The interpreter's installation, which may sit below a directory closed to other users."""
    dirs = [os.path.realpath(sys.base_prefix), os.path.dirname(iso.python)]
    return list(dict.fromkeys(dirs))


def _read_capped(path: Path, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", errors="replace")


class Sandbox:
    """Runs programs under ``limits`` with the strongest isolation the platform allows.

    ``isolation``: "auto" (probe), "strict" (require namespaces, read-only root and uid drop;
    raise SandboxError otherwise) or "basic" (rlimits, session, empty env, temp dir only).
    ``max_concurrent`` bounds simultaneous runs across threads (default: the CPU count).
    """

    def __init__(
        self, limits: Limits | None = None, isolation: str = "auto", max_concurrent: int | None = None
    ) -> None:
        if isolation not in ("auto", "strict", "basic"):
            raise ValueError(f"isolation must be 'auto', 'strict' or 'basic', got {isolation!r}")
        self.limits = limits or Limits()
        self._slots = threading.BoundedSemaphore(max_concurrent or os.cpu_count() or 1)
        self.isolation = current_isolation() if isolation != "basic" else Isolation()
        if isolation == "strict" and not (
            self.isolation.namespaces and self.isolation.readonly_root and self.isolation.uid_drop
        ):
            raise SandboxError(f"strict isolation unavailable here; in effect: {self.isolation.describe()}")

    def run(
        self,
        files: dict[str, str | bytes],
        args: list[str],
        stdin: str = "",
        limits: Limits | None = None,
        companion: Companion | None = None,
    ) -> RunResult:
        """Write ``files`` into a fresh working directory and run ``python -I -B *args`` there.

        With a ``companion``, its function runs next to the program in a process of its own
        (see ``Companion``); the placeholders ``{from_companion}`` and ``{to_companion}`` in
        ``args`` become the program's ends of the two pipes between them, and what the companion
        writes on its report descriptor comes back as ``RunResult.report`` (capped at
        max_file_bytes). The program itself has no channel back but stdout, stderr and its exit.
        """
        if companion is None and any(PIPE_PLACEHOLDERS[0] in a or PIPE_PLACEHOLDERS[1] in a for a in args):
            raise ValueError("the companion pipe placeholders need a companion")
        return _run_isolated(self.isolation, limits or self.limits, files, args, stdin, self._slots, companion)


def _run_isolated(
    iso: Isolation,
    limits: Limits,
    files: dict[str, str | bytes],
    args: list[str],
    stdin: str,
    slots: threading.BoundedSemaphore,
    companion: Companion | None = None,
) -> RunResult:
    with slots, tempfile.TemporaryDirectory(prefix="mcl_sbx_") as tmp:
        uid = _fresh_uid() if iso.uid_drop else None
        paths = _prepare(Path(tmp), files, stdin, uid)
        # headroom for the launcher, the namespace's init and the companion, which are not the program's
        cgroup = _PidsCgroup(iso.pids_cgroup, limits.max_processes + 4) if iso.pids_cgroup else None
        try:
            return _execute(iso, limits, paths, args, uid, cgroup, companion)
        finally:
            if cgroup is not None:
                cgroup.kill_all_and_remove()


def _fresh_uid(avoid: int | None = None) -> int:
    while True:
        uid = UID_BASE + int.from_bytes(os.urandom(4), "little") % UID_SPAN
        if uid != avoid:
            return uid


def _prepare(root: Path, files: dict[str, str | bytes], stdin: str, uid: int | None) -> _Paths:
    paths = _Paths(
        root, root / "work", root / "stage", root / "stdin", root / "stdout", root / "stderr", root / "report"
    )
    root.chmod(0o711)
    paths.work.mkdir(mode=0o700)
    paths.stage.mkdir(mode=0o700)
    for name, text in files.items():
        target = paths.work / name
        if target.parent != paths.work:
            raise ValueError(f"sandbox file names must be plain names, got {name!r}")
        target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)
        target.chmod(0o644)
    if uid is not None:
        os.chown(paths.work, uid, uid)
    paths.stdin.write_text(stdin)
    return paths


def _launcher_config(
    iso: Isolation,
    limits: Limits,
    paths: _Paths,
    argv: list[str],
    uid: int | None,
    cgroup: _PidsCgroup | None,
    pid_fd: int,
) -> dict:
    nproc = limits.max_processes + (0 if uid is not None or os.geteuid() == 0 else _user_process_count())
    cpu = limits.cpu_seconds
    rl = {
        "RLIMIT_CPU": [cpu, cpu + 1],
        "RLIMIT_AS": [limits.memory_bytes] * 2,
        "RLIMIT_NPROC": [nproc] * 2,
        "RLIMIT_FSIZE": [limits.max_file_bytes] * 2,
        "RLIMIT_NOFILE": [limits.max_open_files] * 2,
        "RLIMIT_CORE": [0, 0],
    }
    return {
        "argv": argv,
        "workdir": str(paths.work),
        "rlimits": rl,
        "uid": uid,
        "namespaces": iso.namespaces,
        "readonly_root": iso.readonly_root,
        "expose": _exposed_dirs(iso) if iso.namespaces else [],
        "stage": str(paths.stage),
        "cgroup_procs": cgroup.procs_file if cgroup else None,
        "pid_fd": pid_fd,
    }


class _CompanionLink:
    """The descriptors of one companion: a job file, two pipes and the report file."""

    def __init__(self, companion: Companion, report: Path, uid: int | None) -> None:
        self.companion, self.uid = companion, uid
        self.job = tempfile.TemporaryFile()
        code = marshal.dumps(companion.code)
        self.job.write(len(code).to_bytes(8, "little") + code + companion.job)
        self.job.seek(0)
        self.report = open(report, "wb")
        self.to_program_r, self.to_program_w = os.pipe()
        self.from_program_r, self.from_program_w = os.pipe()

    def program_fds(self) -> list[int]:
        return [self.to_program_r, self.from_program_w]

    def config(self) -> dict:
        return {
            "function": self.companion.function,
            "job_fd": self.job.fileno(),
            "fds": [self.from_program_r, self.to_program_w],
            "report_fd": self.report.fileno(),
            "uid": None if self.uid is None else _fresh_uid(self.uid),
        }

    def all_fds(self) -> list[int]:
        return self.program_fds() + [self.from_program_r, self.to_program_w, self.job.fileno(), self.report.fileno()]

    def close(self) -> None:
        for fd in (self.to_program_r, self.to_program_w, self.from_program_r, self.from_program_w):
            os.close(fd)
        self.job.close()
        self.report.close()


def _execute(
    iso: Isolation,
    limits: Limits,
    paths: _Paths,
    args: list[str],
    uid: int | None,
    cgroup: _PidsCgroup | None,
    companion: Companion | None,
) -> RunResult:
    pid_r, pid_w = os.pipe()
    link = _CompanionLink(companion, paths.report, uid) if companion else None
    fds = link.program_fds() if link else []
    with open(paths.stdin, "rb") as fin, open(paths.stdout, "wb") as fout, open(paths.stderr, "wb") as ferr:
        argv = [iso.python, "-I", "-B"] + [_fill(a, fds) for a in args]
        cfg = _launcher_config(iso, limits, paths, argv, uid, cgroup, pid_w)
        if link:
            cfg.update(program_fds=fds, companion=link.config())
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [_interpreter(), "-I", "-S", "-B", str(LAUNCHER), json.dumps(cfg)],
                stdin=fin,
                stdout=fout,
                stderr=ferr,
                env={},
                cwd=paths.work,
                start_new_session=True,
                close_fds=True,
                pass_fds=[pid_w] + (link.all_fds() if link else []),
            )
        finally:
            os.close(pid_w)
            if link:
                link.close()
        try:
            status, usage, timed_out = _wait(proc, start + limits.timeout_s, pid_r)
        finally:
            os.close(pid_r)
    seconds = time.monotonic() - start
    return _collect(paths, limits, status, usage, timed_out, seconds)


def _fill(arg: str, fds: list[int]) -> str:
    for placeholder, fd in zip(PIPE_PLACEHOLDERS, fds):
        arg = arg.replace(placeholder, str(fd))
    return arg


def _wait(proc: subprocess.Popen, deadline: float, pid_r: int) -> tuple[int, resource.struct_rusage, bool]:
    """Reap the launcher (killing everything at the deadline); then kill what is left of its group."""
    delay, timed_out = 0.002, False
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError as exc:
            raise SandboxError("the sandbox launcher was reaped by another part of this process") from exc
        if pid:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            _kill_program(proc.pid, pid_r)
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    _killpg(proc.pid)
    return status, usage, timed_out


def _kill_program(launcher_pid: int, pid_r: int) -> None:
    """Kill the program's process (the launcher has not reaped it yet, so its pid is still ours)."""
    os.set_blocking(pid_r, False)
    try:
        data = os.read(pid_r, 64)
    except BlockingIOError:
        data = b""
    if data.strip().isdigit():
        _signal(int(data), signal.SIGKILL)
    _killpg(launcher_pid)


def _collect(
    paths: _Paths, limits: Limits, status: int, usage: resource.struct_rusage, timed_out: bool, seconds: float
) -> RunResult:
    cap = limits.max_file_bytes
    stderr = _read_capped(paths.stderr, cap)
    if SETUP_ERROR in stderr[:4096] and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 126:
        raise SandboxError(stderr.strip())
    exceeded = max(paths.stdout.stat().st_size, paths.stderr.stat().st_size) >= cap
    report = b""
    if paths.report.exists():
        with open(paths.report, "rb") as f:
            report = f.read(cap)
    return RunResult(
        exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        timed_out=timed_out,
        output_exceeded=exceeded,
        stdout=_read_capped(paths.stdout, cap),
        stderr=stderr,
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        report=report,
    )


_DETECTED: Isolation | None = None
_DETECT_LOCK = threading.Lock()


def _probe() -> Isolation:
    if sys.platform != "linux" or os.geteuid() != 0:
        return Isolation()
    cgroup = _find_pids_cgroup_base()
    if cgroup:
        _remove_stale_cgroups(Path(cgroup))
    candidates = [
        Isolation(True, True, True, cgroup),
        Isolation(True, True, False, cgroup),
        Isolation(True, False, False, cgroup),
        Isolation(False, False, False, cgroup),
    ]
    for iso in candidates:
        for attempt in (iso, replace(iso, pids_cgroup=None)) if iso.pids_cgroup else (iso,):
            if _probe_one(attempt):
                return attempt
    return Isolation()


def _probe_one(iso: Isolation) -> bool:
    try:
        res = _run_isolated(
            iso, Limits(timeout_s=20), {"p.py": "print(6 * 7)"}, ["p.py"], "", threading.BoundedSemaphore(1)
        )
    except (SandboxError, OSError):
        return False
    return res.exit_code == 0 and res.stdout.strip() == "42"


def current_isolation() -> Isolation:
    """The isolation ``Sandbox(isolation="auto")`` uses here: the strongest that works, probed
    once per process by running a trivial program under each candidate in turn."""
    global _DETECTED
    with _DETECT_LOCK:
        if _DETECTED is None:
            _DETECTED = _probe()
        return _DETECTED
