"""The `python` tool's sandbox: one code cell in a separate, short-lived process, so that nothing the model writes
can hang, flood, starve or damage the trainer.

Layers, from the strongest:
  process     its own session (the whole process group is killed on a time-out or an output flood) and, where
              `unshare` works (user namespaces), its own PID namespace: the cell's descendants die with it
  network     its own empty network namespace (`unshare --net`: no interface but a down loopback), else none at
              the OS level; in both cases an audit hook refuses socket creation / connection in Python
  OS limits   resource.setrlimit: CPU seconds, address space (RLIMIT_AS), file size, open files, processes
  audit hook  (sys.addaudithook, installed before the cell runs) refuses os.fork / subprocess / os.system / exec,
              opening a file for writing outside the scratch directory (and reading outside it and the Python
              installation), deleting / renaming / listing outside it, and ctypes / loading native libraries
The audit hook is a guard against accidents and a model's naive attempts, not a security boundary against
hostile native code; the OS layers are what holds then. Root ignores RLIMIT_NPROC, so forks are stopped by the
hook and the PID namespace, not by the limit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Runs in the child before the cell: limits, then the audit hook, then the cell (last expression echoed).
_BOOT = r"""
import ast, os, resource, sys
cfg = eval(sys.argv[1])
scratch = os.path.realpath(cfg["scratch"])
for name, value in (("RLIMIT_CPU", cfg["cpu_s"]), ("RLIMIT_AS", cfg["mem"]), ("RLIMIT_FSIZE", cfg["fsize"]),
                    ("RLIMIT_NOFILE", 64), ("RLIMIT_NPROC", cfg["nproc"]), ("RLIMIT_CORE", 0)):
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError):
        pass
src = open(os.path.join(scratch, "cell.py"), encoding="utf-8").read()
import math, statistics, json, re, fractions, decimal, collections, itertools, functools, random, datetime  # noqa
try:
    import numpy  # noqa: imported before the hook (it loads native code)
except Exception:
    pass
readable = [scratch] + [os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
readable += [os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)]
readable += ["/dev/null", "/dev/urandom", "/proc/self", "/etc/localtime", "/usr/share/zoneinfo"]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _inside(path, roots):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "/proc/self/fd")
    except Exception:
        return False
    return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

class SandboxRefused(PermissionError):
    pass

BLOCKED = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
           "os.kill", "os.killpg", "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
           "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata", "os.chdir",
           "os.setuid", "os.setgid", "sys.settrace", "sys.setprofile", "os.putenv", "os.unsetenv"}
MUTATE = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown", "os.link", "os.symlink",
          "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.chflags"}
LIST = {"os.listdir", "os.scandir", "glob.glob", "os.walk"}

def hook(event, args):
    if event in BLOCKED or event.startswith(("socket.", "os.exec", "os.spawn")):
        what = "network access" if event.startswith("socket") else "starting processes" if event.startswith(
            ("os.fork", "os.system", "os.exec", "os.posix", "os.spawn", "subprocess")) else event
        raise SandboxRefused(f"sandbox: {what} is not allowed ({event})")
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS
        if writing and not _inside(path, [scratch]):
            raise SandboxRefused(f"sandbox: writing {os.fsdecode(path)!r} is not allowed: only the scratch "
                                 "directory (the current directory) is writable")
        if not writing and not _inside(path, readable):
            raise SandboxRefused(f"sandbox: reading {os.fsdecode(path)!r} is not allowed outside the scratch "
                                 "directory")
    elif event in MUTATE:
        for p in args[:2]:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p, [scratch]):
                raise SandboxRefused(f"sandbox: {event} on {os.fsdecode(p)!r} outside the scratch directory")
    elif event in LIST:
        p = args[0] if args else "."
        if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p or ".", readable):
            raise SandboxRefused(f"sandbox: listing {os.fsdecode(p)!r} is not allowed")

os.chdir(scratch)
sys.addaudithook(hook)
del hook
import traceback
try:
    tree = ast.parse(src, "<cell>")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    env = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(tree, "<cell>", "exec"), env)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), env)
        if value is not None:
            print(repr(value))
except BaseException as e:  # the cell's traceback without the sandbox's own frames
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<cell>"]
    sys.stdout.flush()
    print("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
          + "".join(traceback.format_exception_only(type(e), e)), end="", file=sys.stderr)
    sys.exit(1)
"""


@dataclass
class SandboxLimits:
    time_s: float = 5.0  # wall clock; CPU seconds are capped at the same value
    memory_mb: int = 512  # address space (RLIMIT_AS); the interpreter itself needs ~100 MB
    output_bytes: int = 8192  # stdout + stderr kept; more cuts the cell off
    file_mb: int = 16  # largest file a cell may write in its scratch directory
    max_processes: int = 64  # RLIMIT_NPROC (ignored for root: the audit hook stops forks then)


@dataclass
class CellResult:
    output: str  # what the cell printed (cut at the output cap), plus the sandbox's note when it was cut off
    ok: bool  # exited normally with status 0
    reason: str  # "ok" | "error" | "timeout" | "output_limit" | "killed"
    seconds: float
    isolation: str  # how the network was cut: "netns" (unshare) or "audit-hook"

    def text(self) -> str:
        """The tool turn the model reads."""
        return self.output if self.output.strip() else f"(no output; {self.reason})"


def _unshare_prefix() -> list[str]:
    """['unshare', ...] when new user + network + PID namespaces can be made here (checked once), else []."""
    global _UNSHARE
    if _UNSHARE is None:
        exe = shutil.which("unshare")
        cmd = [exe, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"] if exe else []
        ok = False
        if cmd:
            try:
                ok = subprocess.run([*cmd, "true"], capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _UNSHARE = cmd if ok else []
    return _UNSHARE


_UNSHARE: list[str] | None = None


def run_cell(code: str, scratch: str | Path | None = None, limits: SandboxLimits | None = None) -> CellResult:
    """Run `code` in a fresh sandboxed interpreter with `scratch` (a new temporary directory when None, removed
    after) as its only writable directory. Never raises for what the cell does."""
    lim = limits or SandboxLimits()
    own = scratch is None
    d = Path(tempfile.mkdtemp(prefix="keye-cell-")) if own else Path(scratch)
    d.mkdir(parents=True, exist_ok=True)
    try:
        (d / "cell.py").write_text(code, encoding="utf-8")
        cfg = {
            "scratch": str(d.resolve()),
            "cpu_s": max(1, int(lim.time_s + 1)),
            "mem": int(lim.memory_mb) << 20,
            "fsize": int(lim.file_mb) << 20,
            "nproc": int(lim.max_processes),
        }
        prefix = _unshare_prefix()
        # -I: no PYTHONPATH, user site or cwd on the path; -S: no site hooks. The parent's site-packages are put
        # back by hand so the cell can use numpy.
        site = [p for p in sys.path if p.endswith("site-packages")]
        boot = f"import sys; sys.path[1:1] = {site!r}\n{_BOOT}"
        cmd = [*prefix, sys.executable, "-I", "-S", "-c", boot, repr(cfg)]
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
        }
        return _supervise(cmd, env, d, lim, "netns" if prefix else "audit-hook")
    finally:
        if own:
            shutil.rmtree(d, ignore_errors=True)


def _supervise(
    cmd: list[str], env: dict[str, str], cwd: Path, lim: SandboxLimits, isolation: str
) -> CellResult:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    buf = bytearray()
    flooded = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            if len(buf) < lim.output_bytes:
                buf.extend(chunk[: lim.output_bytes - len(buf)])
            if len(buf) >= lim.output_bytes:
                flooded.set()
                _kill(proc)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reason = "ok"
    try:
        while proc.poll() is None:
            if flooded.is_set():
                break
            if time.monotonic() - t0 > lim.time_s:
                reason = "timeout"
                _kill(proc)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and reason != "ok":
            _kill(proc)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.wait()
        reader.join(timeout=2)
        if proc.stdout is not None:
            proc.stdout.close()
    if flooded.is_set():
        reason = "output_limit"
    rc = proc.returncode
    text = bytes(buf).decode("utf-8", errors="replace")
    if reason == "ok" and rc != 0:
        reason = "killed" if rc < 0 or rc == 137 else "error"
    note = {
        "timeout": f"\n[sandbox: the cell ran past its {lim.time_s:g} s limit and was stopped]",
        "output_limit": f"\n[sandbox: output passed {lim.output_bytes} bytes; the cell was stopped]",
        "killed": f"\n[sandbox: the cell was killed by signal {-rc if rc < 0 else rc - 128} (a CPU, memory or "
        "file limit)]",
    }.get(reason, "")
    return CellResult(text + note, reason == "ok", reason, time.monotonic() - t0, isolation)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the cell's whole process group (its session), ignoring one that is already gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
