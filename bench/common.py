"""What the benchmarks share: a mount of this checkout started through the CLI, as an
operator starts one, and stopped; a process's memory figures from /proc."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from azregfs.demo.azurite import Azurite

ROOT = Path(__file__).resolve().parent.parent
# The benchmarks use the checkout's test instruments (testkit/), which are never installed.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def start_mount(azurite: Azurite, container: str, path: Path, options: str, log_path: Path,
                log_level: str = "INFO", timeout: float = 60.0) -> subprocess.Popen:
    """`azregfs mount --foreground` of this checkout (whatever the venv's editable install
    says) on the benchmark's own Azurite, once the mount is live; its log in log_path."""
    path.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("AZURE_")}
    env["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    extra = ["-o", options] if options else []
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "azregfs", "mount", "--foreground", "--log-level", log_level,
             *extra, container, str(path)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mount failed, see {log_path}")
        time.sleep(0.05)
    return process


def stop_mount(path: Path, process: subprocess.Popen, timeout: float = 600.0) -> None:
    """Unmount (the daemon commits, then exits); force it if it does not within timeout."""
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", str(path)], check=False)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        subprocess.run(["fusermount3", "-uz", str(path)], check=False)


def proc_status_kib(pid: int, *fields: str) -> dict[str, int]:
    """Fields of /proc/PID/status in KiB (VmRSS, VmHWM, RssAnon...)."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key = line.split(":", 1)[0]
            if key in fields:
                found[key] = int(line.split()[1])
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (Azurite is node under npx)."""
    found = [pid]
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for child in children.stdout.split():
        found += process_tree(int(child))
    return found


PROFILE_NATIVE = False  # py-spy --native: C frames too (libfuse, hashing), pausing the daemon


@contextlib.contextmanager
def profiled(pid: int, out: Path | None, rate: int = 250) -> Iterator[None]:
    """Sample the daemon with py-spy while the block runs (nothing if out is None): its
    collapsed stacks land in out, and ``hot_spots`` names where the seconds went."""
    if out is None:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw",
                            "--rate", str(rate), "--threads",
                            # native frames need the process paused for each sample
                            *(["--native"] if PROFILE_NATIVE else ["--nonblocking"]),
                            "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def hot_spots(collapsed: Path, top: int = 15) -> list[tuple[str, float, float]]:
    """(function, self share, inclusive share) of the samples in a py-spy raw file, the
    biggest self shares first; idle waits (epoll, a worker thread's queue) excluded."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")[1:]]
        if not frames or any(idle in frames[-1] for idle in _IDLE) or any(
                wait in frame for frame in frames[-4:] for wait in _NATIVE_WAITS):
            continue
        count = int(count_text)
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return [(frame, n / total, inclusive[frame] / total) for frame, n in own.most_common(top)]


# With --native, a thread waiting shows C frames (an unnamed libc address at the leaf): a
# lock, a condition (the GIL itself, taken back after a system call) or a poll.
_NATIVE_WAITS = ("pthread_cond_wait", "pthread_cond_timedwait", "PyThread_acquire_lock",
                 "epoll_wait", "poll (libc")
_IDLE = ("epoll", "_worker (threading", "wait (threading", "select (selectors",
         "get (trio/_core/_thread_cache", "_handle_request (trio/_core/_thread_cache")


class CpuMeter:
    """CPU seconds spent by named processes over one step, plus this process (a proxy
    running in it) and the children it reaped meanwhile (skopeo). On a machine whose
    cores are all busy, wall time >= total CPU / cores: the step's floor."""

    def __init__(self, processes: dict[str, list[int]]) -> None:
        self.processes = processes

    def _sample(self) -> dict[str, float]:
        sample = {}
        for name, pids in self.processes.items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(OSError):
                    total += cpu_seconds(pid)
            sample[name] = total
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        sample["bench (proxy)"] = own.ru_utime + own.ru_stime
        sample["client (skopeo)"] = children.ru_utime + children.ru_stime
        return sample

    def __enter__(self) -> CpuMeter:
        self.before = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        after = self._sample()
        self.used = {name: after[name] - self.before[name] for name in after}
