"""Child-side setup of the sandbox: run as ``python -I -S -B sandbox_launcher.py CONFIG_JSON``.

This file is executed by path in a fresh interpreter (never imported by the package), so it has no
threads and may fork, change namespaces, mounts and credentials before exec'ing the program. The
parent (``sandbox.py``) has already put it in a new session with an empty environment, its working
directory set, and stdin/stdout/stderr redirected to files.

CONFIG_JSON keys:
  argv            the program to exec (argv[0] is the interpreter path)
  workdir         the only writable directory left to the program
  rlimits         {"RLIMIT_CPU": [soft, hard], ...}
  uid             unprivileged uid/gid to run as (null: keep the current credentials)
  namespaces      true: new pid, mount, network, ipc and uts namespaces (root only)
  readonly_root   true: every mount read-only except workdir (needs namespaces)
  expose          directories the program needs (the interpreter) whose ancestors may be closed to
                  other users; made reachable inside the private mount namespace
  stage           an empty directory used while exposing
  cgroup_procs    a cgroup's ``cgroup.procs`` to join before anything else (null: none)
  pid_fd          fd on which to write the host pid of the launcher's child (the program, or the
                  namespace's pid 1, whose death ends the whole namespace), then close
  program_fds     fds the program keeps across exec (its ends of the companion's pipes)
  companion       null, or {"function", "job_fd", "fds", "report_fd", "uid"}: trusted code run in a
                  second child, never in the program's process. job_fd holds an 8-byte length,
                  the marshalled code of a module defining ``function``, then the job; the
                  launcher reads it and runs the module before anything of the program exists, then
                  forks the companion, which closes program_fds, drops to ``uid`` (another
                  unprivileged uid than the program's), and calls ``function(job, *fds, report_fd)``.
                  The program never holds job_fd, report_fd or the companion's fds.

Process tree: launcher (root, host namespaces) -> [namespace pid 1 (root, mini init) ->]
program (unprivileged uid) [and companion (another unprivileged uid)]. The launcher makes itself
not dumpable first thing, so its children forked without exec (pid 1, the companion) cannot be
traced or have their /proc entries opened by the program even under the same uid. A setup failure
is written to stderr prefixed with SETUP_ERROR and exits with status 126. When the program is
killed by a signal the launcher dies of the same signal, so the parent can tell a signal from an
exit status.
"""

import ctypes
import json
import marshal
import os
import resource
import signal
import sys

SETUP_ERROR = "mcl-sandbox-setup-error:"

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 0x1000, 0x2000, 0x4000, 0x40000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (syscalls >= 424 are unified)
MOUNT_ATTR_RDONLY = 0x1
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def set_readonly(path: str, readonly: bool, recursive: bool) -> None:
    attr = MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    check(
        libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)),
        f"mount_setattr {path}",
    )


def closed_ancestor(path: str) -> str | None:
    """The top-most ancestor of ``path`` that other users cannot traverse, if any."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    for i in range(1, len(parts) + 1):
        d = os.sep + os.sep.join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def expose(path: str, stage: str) -> None:
    """Cover the closed ancestor of ``path`` with an empty tmpfs and put ``path`` back inside it."""
    top = closed_ancestor(path)
    if top is None:
        return
    mount(path, stage, None, MS_BIND | MS_REC)
    mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    os.makedirs(path, exist_ok=True)
    mount(stage, path, None, MS_MOVE)


def setup_mounts(cfg: dict) -> None:
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    for path in cfg.get("expose", []):
        expose(path, cfg["stage"])
    if cfg.get("readonly_root"):
        mount(cfg["workdir"], cfg["workdir"], None, MS_BIND)
        set_readonly("/", True, recursive=True)
        set_readonly(cfg["workdir"], False, recursive=False)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def confine(cfg: dict, workdir: str, uid: int | None) -> None:
    """Per-process limits and credentials (then the prctls that the credential change clears)."""
    os.chdir(workdir)
    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if uid is not None:
        drop_privileges(uid)
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl pdeathsig")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")


def close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:  # already closed in this process
            pass


def companion_fds(cfg: dict) -> list[int]:
    spec = cfg.get("companion") or {}
    return spec.get("fds", []) + ([spec["report_fd"]] if "report_fd" in spec else [])


def exec_program(cfg: dict) -> None:
    """Confine this child and exec the program (never returns)."""
    close_all(companion_fds(cfg) + [cfg["pid_fd"]])
    for fd in cfg.get("program_fds", []):
        os.set_inheritable(fd, True)
    confine(cfg, cfg["workdir"], cfg.get("uid"))
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    os.execve(cfg["argv"][0], cfg["argv"], {})


def load_companion(cfg: dict) -> tuple | None:
    """(function, job) of the companion, read while nothing of the program exists yet."""
    spec = cfg.get("companion")
    if not spec:
        return None
    with os.fdopen(spec["job_fd"], "rb") as f:
        data = f.read()
    size = int.from_bytes(data[:8], "little")
    ns = {"__name__": "mcl_companion"}
    exec(marshal.loads(data[8 : 8 + size]), ns)
    return ns[spec["function"]], data[8 + size :]


def run_companion(cfg: dict, companion: tuple) -> None:
    function, job = companion
    spec = cfg["companion"]
    close_all(cfg.get("program_fds", []) + [cfg["pid_fd"]])
    confine(cfg, "/", spec.get("uid"))
    check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl dumpable")
    function(job, *spec["fds"], spec["report_fd"])
    os._exit(0)


def spawn(cfg: dict, companion: tuple | None) -> tuple[int, int | None]:
    """Fork the companion (if any) and the program; close their fds here so that each sees the
    other's end of file. Returns (program pid, companion pid or None)."""
    other = None
    if companion is not None:
        other = os.fork()
        if other == 0:
            run_guarded(lambda c: run_companion(c, companion), cfg)
    program = os.fork()
    if program == 0:
        run_guarded(exec_program, cfg)
    close_all(cfg.get("program_fds", []) + companion_fds(cfg))
    return program, other


def combined(program_status: int, companion_status: int | None) -> int:
    """The program's wait status, unless the companion could not be set up."""
    if companion_status is not None and os.WIFEXITED(companion_status) and os.WEXITSTATUS(companion_status) == 126:
        return companion_status
    return program_status


def namespace_init(cfg: dict, status_fd: int, companion: tuple | None) -> None:
    """As pid 1 of the new namespace: set up the mounts, start the program (and the companion)
    as ordinary processes (so they get ordinary signal semantics), reap orphans, and pass the
    wait status to the launcher (pid 1 cannot die of its own signals). When pid 1 exits the
    kernel kills everything left in the namespace; pid 1 dies with the launcher (pdeathsig)."""
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl pdeathsig")
    setup_mounts(cfg)
    program, other = spawn(cfg, companion)
    statuses = {}
    while program not in statuses or (other is not None and other not in statuses):
        pid, status = os.wait()
        statuses[pid] = status
    os.write(status_fd, str(combined(statuses[program], statuses.get(other))).encode())
    os._exit(0)


def run_guarded(step, cfg: dict) -> None:
    """Run a setup step in a child that must not return; report failures as setup errors."""
    try:
        step(cfg)
    except BaseException as exc:  # nothing of the program has run yet
        os.write(2, f"{SETUP_ERROR} {type(exc).__name__}: {exc}\n".encode())
    os._exit(126)


def mirror(status: int) -> None:
    """Leave the way a waited-for child left: the same exit status or the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))


def start_in_namespaces(cfg: dict, companion: tuple | None) -> tuple[int, int]:
    """Fork the namespace's pid 1; return its pid and the read end of the pipe on which it
    reports the wait status."""
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    status_r, status_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        close_all([cfg["pid_fd"], status_r])
        run_guarded(lambda c: namespace_init(c, status_w, companion), cfg)
    os.close(status_w)
    close_all(cfg.get("program_fds", []) + companion_fds(cfg))
    return pid, status_r


def start(cfg: dict, companion: tuple | None) -> tuple[int, int | None, int | None]:
    """Start the children; return the pid to wait for (and to kill on timeout), the companion's
    pid when it is our child, and the status pipe of the namespace's pid 1."""
    if cfg.get("namespaces"):
        pid, status_r = start_in_namespaces(cfg, companion)
        return pid, None, status_r
    return *spawn(cfg, companion), None


def wait_status(cfg: dict, pid: int, other: int | None, status_r: int | None) -> int:
    os.write(cfg["pid_fd"], f"{pid}\n".encode())
    os.close(cfg["pid_fd"])
    _, status = os.waitpid(pid, 0)
    if status_r is not None:
        reported = os.read(status_r, 64)
        return int(reported) if reported.strip() else status
    return combined(status, os.waitpid(other, 0)[1] if other is not None else None)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    try:
        check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl dumpable")
        if cfg.get("cgroup_procs"):
            with open(cfg["cgroup_procs"], "w") as f:
                f.write(str(os.getpid()))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        children = start(cfg, load_companion(cfg))
    except BaseException as exc:
        os.write(2, f"{SETUP_ERROR} {type(exc).__name__}: {exc}\n".encode())
        os._exit(126)
    mirror(wait_status(cfg, *children))


if __name__ == "__main__":
    main()
