"""The code sandbox's first stage, run inside the child: limits, Landlock, seccomp, the Python guard, then the program.

`rewards/code_sandbox.py` starts it as `python -I -B sandbox_boot.py CONFIG_JSON` with the fresh box directory
as cwd. It imports only light standard-library modules and forgets ctypes after use, so that no module the
guard refuses (subprocess's _posixsubprocess, ctypes) is left importable from `sys.modules`.
"""

from __future__ import annotations

import json
import os
import resource
import sys

SETUP_FAILED = 121  # exit status, with a "raylhf-sandbox:" line on stderr, when a layer the parent asked for fails

# Landlock (linux/landlock.h). Filesystem rights, by the ABI version that introduced them.
_FS_V1 = (1 << 13) - 1  # execute, write_file, read_file, read_dir, remove_*, make_* (13 rights)
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_NET_TCP = (1 << 0) | (1 << 1)  # bind_tcp, connect_tcp (ABI 4)
_SCOPES = (1 << 0) | (1 << 1)  # abstract unix sockets, signals (ABI 6)
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # the same number on every architecture
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2

# Read-only system directories; the interpreter's own prefixes are added at run time. /etc, /proc, /sys,
# /home, /root and /tmp stay unreadable (no dataset files, credentials or other boxes).
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")

# Python guard: audit events refused outright, modules refused on import, events whose path arguments
# (by position) must lie inside the box.
_REFUSED_EVENTS = frozenset({
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__",
})
_REFUSED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend"})
_PATH_EVENTS = {
    "os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (1,), "os.remove": (0,), "os.rmdir": (0,),
    "os.mkdir": (0,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
}


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is missing or disabled."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(0, libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1)))


def apply_landlock(abi: int, box: str, read_dirs: list[str]) -> None:
    """Allow every filesystem right in `box`, read/execute in `read_dirs`, nothing elsewhere; no TCP; stay scoped."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    def check(result: int, what: str) -> int:
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return result

    fs = _FS_V1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0) | (_FS_IOCTL_DEV if abi >= 5 else 0)
    attr = RulesetAttr(fs, _NET_TCP if abi >= 4 else 0, _SCOPES if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the struct grew with the ABI
    ruleset = check(libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                                 ctypes.c_uint32(0)), "landlock_create_ruleset")

    def allow(path: str, rights: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # a directory this system does not have
        rule = PathBeneath(rights & fs, fd)
        check(libc.syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule),
                           ctypes.c_uint32(0)), f"landlock_add_rule({path})")
        os.close(fd)

    for path in read_dirs:
        allow(path, _READ_FILE | _READ_DIR | _EXECUTE)
    allow(box, fs)
    allow("/dev/null", _READ_FILE | _WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV)
    for path in ("/dev/zero", "/dev/urandom"):
        allow(path, _READ_FILE)
    check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    check(libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
          "landlock_restrict_self")
    os.close(ruleset)


def forbid_new_processes() -> bool:
    """Seccomp filter: fork, vfork and clone without CLONE_THREAD fail with EAGAIN (threads still work).

    Returns False on an architecture it has no syscall table for (only x86_64 and aarch64 are known).
    """
    import ctypes
    import errno

    machine = os.uname().machine
    if machine == "x86_64":
        audit_arch, clone, refused = 0xC000003E, 56, (57, 58)  # fork, vfork
    elif machine == "aarch64":
        audit_arch, clone, refused = 0xC00000B7, 220, ()
    else:
        return False
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
    allow, kill = 0x7FFF0000, 0x80000000
    eagain, enosys = 0x00050000 | errno.EAGAIN, 0x00050000 | errno.ENOSYS
    clone3, clone_thread, x32_bit = 435, 0x00010000, 0x40000000
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, kill),  # another ABI (int 0x80): die
            (ld, 0, 0, 0)]  # the syscall number
    if machine == "x86_64":
        prog += [(jge, 0, 1, x32_bit), (ret, 0, 0, kill)]
    for nr in refused:
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eagain)]
    prog += [(jeq, 0, 1, clone3), (ret, 0, 0, enosys),  # glibc then falls back to clone
             (jeq, 0, 3, clone), (ld, 0, 0, 16), (jset, 1, 0, clone_thread), (ret, 0, 0, eagain),  # args[0] = flags
             (ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*insn) for insn in prog])
    libc = ctypes.CDLL(None, use_errno=True)
    for args, what in (((_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)"),
                       ((_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(Program(len(prog), filters)), 0, 0),
                        "prctl(SECCOMP)")):
        if libc.prctl(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
    return True


def install_guard(box: str) -> None:
    """Audit hook: refuse process creation, signals, sockets, ctypes and writes outside `box`.

    A backstop in Python only: a determined program can get around it (e.g. by patching `posixpath`),
    which is why the kernel layers come first wherever they are available.
    """
    import posixpath

    realpath, join, isabs, getcwd = posixpath.realpath, posixpath.join, posixpath.isabs, os.getcwd
    inside = realpath(box) + "/"
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    refused_events, refused_modules, path_events = _REFUSED_EVENTS, _REFUSED_MODULES, dict(_PATH_EVENTS)

    def check_path(path) -> None:
        if isinstance(path, int):
            return  # an already open descriptor
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        full = realpath(path if isabs(path) else join(getcwd(), path))
        if full + "/" != inside and not full.startswith(inside) and full != "/dev/null":
            raise PermissionError(f"sandbox: writing {path!r} is not allowed (outside the working directory)")

    def hook(event: str, args: tuple) -> None:
        if event in refused_events or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and str(args[0]).partition(".")[0] in refused_modules:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = isinstance(mode, str) and any(c in mode for c in "wax+")
            if writes or (isinstance(flags, int) and flags & write_flags):
                check_path(path)
        elif event in path_events:
            for i in path_events[event]:
                check_path(args[i])

    sys.addaudithook(hook)


def _report(message: str) -> None:
    sys.stderr.write(f"raylhf-sandbox: {message}\n")
    sys.stderr.flush()
    os._exit(SETUP_FAILED)


def _set_limits(rlimits: dict[str, list[int]]) -> None:
    for name, (soft, hard) in rlimits.items():
        resource.setrlimit(getattr(resource, name), (soft, hard))


def _read_dirs() -> list[str]:
    prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    return sorted(prefixes) + [p for p in SYSTEM_READ if p not in prefixes]


def _probe(box: str) -> dict[str, int]:
    """Apply every kernel layer this machine offers, best effort, and say which took."""
    report = {"landlock_abi": 0, "seccomp": 0}
    try:
        abi = landlock_abi()
        if abi:
            apply_landlock(abi, box, _read_dirs())
            report["landlock_abi"] = abi
    except Exception:
        pass
    try:
        report["seccomp"] = int(forbid_new_processes())
    except Exception:
        pass
    return report


def _forget_modules(*roots: str) -> None:
    """Drop modules the setup imported, so that an `import` by the program goes through the guard again."""
    for name in [n for n in sys.modules if n.partition(".")[0] in roots]:
        del sys.modules[name]


def _run_program(path: str) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        source = f.read()
    main = type(sys)("__main__")
    main.__file__ = "main.py"
    sys.modules["__main__"] = main
    sys.argv = ["main.py"]
    exec(compile(source, "main.py", "exec"), main.__dict__)


def main(argv: list[str]) -> None:
    """Apply the layers named in the JSON config, then run `main.py` from the box as `__main__`.

    With "probe": true, apply what this machine supports and print which layers took, as JSON, instead.
    """
    cfg = json.loads(argv[1])
    box = os.getcwd()
    if cfg.get("probe"):
        print(json.dumps(_probe(box)))
        return
    try:
        _set_limits(cfg["rlimits"])
        if cfg["landlock_abi"]:
            apply_landlock(cfg["landlock_abi"], box, _read_dirs())
        if cfg["seccomp"] and not forbid_new_processes():
            raise OSError("seccomp filter not supported on this architecture")
        _forget_modules("ctypes", "_ctypes")
        if cfg["guard"]:
            install_guard(box)
    except Exception as e:  # fail closed: the parent asked for these layers because the probe found them
        _report(f"setup failed: {type(e).__name__}: {e}")
    _run_program(os.path.join(box, "main.py"))


if __name__ == "__main__":
    main(sys.argv)
