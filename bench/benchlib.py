"""Shared helpers of drover's benchmark scripts (Python 3.11 stdlib only).

Processes, ports, /proc readings, wrk runs and their parsing, medians.
The scripts that use it: throughput.py, ready.py, footprint.py, scale.py,
suite.py.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
RESULTS = REPO / "bench" / "results"
HOST = "127.0.0.1"
DEFAULT_DROVER = REPO / "target" / "release" / "drover"
DEFAULT_DIRECT = REPO / "target" / "release" / "examples" / "direct"
DEFAULT_VENV = REPO / "target" / "test-venv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def child_env(venv: Path | None = None) -> dict[str, str]:
    """The environment for a contender: no DROVER_*/LISTEN_* leaking in
    (every drover option reads DROVER_<NAME>), the venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("LISTEN_") or k.startswith("DROVER_"))}
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
    env.pop("PYTHONPATH", None)
    return env


# --------------------------------------------------------------------------
# contenders' command lines


def drover_argv(drover: Path, port: int, admin: int, workers: int, *extra: str) -> list[str]:
    return [str(drover), "--host", HOST, "--port", str(port), "--admin-host", HOST,
            "--admin-port", str(admin), "--workers", str(workers), "--drain-delay", "0",
            "--log-level", "warn", *extra]


def gunicorn_worker_cmd(venv: Path) -> list[str]:
    """One drover worker running gunicorn: no --bind (LISTEN_FDS is found)."""
    return [str(venv / "bin" / "gunicorn"), "-w", "1", "--chdir", str(FIXTURES),
            "--log-level", "warning", "wsgi_app:app"]


def uvicorn_worker_cmd(venv: Path) -> list[str]:
    return [str(venv / "bin" / "uvicorn"), "--fd", "3", "--app-dir", str(FIXTURES),
            "--log-level", "warning", "asgi_app:app"]


def gunicorn_own(venv: Path, port: int, workers: int) -> list[str]:
    return [str(venv / "bin" / "gunicorn"), "-w", str(workers), "-b", f"{HOST}:{port}",
            "--chdir", str(FIXTURES), "--log-level", "warning", "wsgi_app:app"]


def uvicorn_own(venv: Path, port: int, workers: int) -> list[str]:
    return [str(venv / "bin" / "uvicorn"), "--workers", str(workers), "--host", HOST,
            "--port", str(port), "--app-dir", str(FIXTURES), "--log-level", "warning",
            "asgi_app:app"]


def direct_argv(direct: Path, port: int, threads: int = 1) -> list[str]:
    return [str(direct), str(port), "--host", HOST, "--threads", str(threads)]


# --------------------------------------------------------------------------
# processes


def spawn(argv: list[str], env: dict[str, str], log=None) -> subprocess.Popen:
    """Starts a contender in its own session (so its tree can be killed)."""
    return subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                            start_new_session=True)


def _stat(pid: int):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    return rest[0], int(rest[19])  # state, starttime


def descendants(pid: int) -> list[int]:
    out, todo, seen = [], [pid], {pid}
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in seen:
                    seen.add(k)
                    out.append(k)
                    todo.append(k)
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X", "x")


def stop_tree(p: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15.0) -> float | None:
    """Sends sig to p, waits for the whole tree to be gone; SIGKILLs it all
    after timeout. Returns the seconds it took, or None if it was killed."""
    if p.poll() is not None:
        return 0.0
    tree = [p.pid] + descendants(p.pid)
    t0 = time.perf_counter()
    try:
        os.kill(p.pid, sig)
    except OSError:
        pass
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        if p.poll() is not None and not any(alive(x) for x in tree[1:]):
            return time.perf_counter() - t0
        time.sleep(0.002)
    kill_tree(p, tree)
    return None


def kill_tree(p: subprocess.Popen, known: list[int] | None = None) -> None:
    tree = list(known or [])
    if p.poll() is None:
        tree += descendants(p.pid)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass
    for pid in [p.pid] + tree:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(rest[11]) + int(rest[12])) / _TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of pid and every live descendant."""
    return sum(cpu_seconds(p) for p in [pid] + descendants(pid))


def task_cpu(pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of pid and of its descendants, keyed by
    (process, thread): how the work spreads over event loops."""
    out = {}
    for p in [pid] + descendants(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[(p, int(t))] = (int(rest[11]) + int(rest[12])) / _TCK
    return out


def vmrss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------
# HTTP


def get(port: int, path: str = "/", method: str = "GET", timeout: float = 2.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_200(port: int, path: str = "/", timeout: float = 30.0, p: subprocess.Popen | None = None,
             poll: float = 0.0005) -> float:
    """Polls until path answers 200; returns time.perf_counter() of that 200."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            if get(port, path, timeout=1.0)[0] == 200:
                return time.perf_counter()
        except (OSError, http.client.HTTPException):
            pass
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{p.args[0]} exited with {p.returncode} before answering")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no 200 on {path} of port {port} within {timeout} s")
        time.sleep(poll)


# --------------------------------------------------------------------------
# wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(s: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", s)
    if not m:
        raise ValueError(f"not a wrk duration: {s!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    """requests/s, p50/p99 (ms), request count, errors, non-2xx from
    `wrk --latency` output."""
    r: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise ValueError("no Requests/sec in wrk output:\n" + out)
    r["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    r["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            r[f"p{pct}_ms"] = round(_ms(m.group(1)), 4)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                  map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non_2xx"] = int(m.group(1)) if m else 0
    return r


def wrk(port: int, threads: int, conns: int, seconds: float, path: str = "/",
        timeout_s: int = 5, cpus: str | None = None, headers: tuple[str, ...] = ()) -> dict:
    """One wrk run; cpus pins wrk (taskset -c) when given. wrk takes whole
    seconds only."""
    argv = (["taskset", "-c", cpus] if cpus else []) + [
        "wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://{HOST}:{port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
    return parse_wrk(out.stdout)


# --------------------------------------------------------------------------
# numbers


def established_per_pid(port: int) -> list[int]:
    """Established connections on local `port` per process holding them
    (`ss -tnp`), busiest first."""
    import collections
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=10).stdout
    return sorted(collections.Counter(re.findall(r"pid=(\d+)", out)).values(), reverse=True)


def median(xs):
    return statistics.median(xs) if xs else None


def p90(xs):
    xs = sorted(xs)
    return xs[max(0, -(-len(xs) * 9 // 10) - 1)] if xs else None


def median_ci95(xs, resamples: int = 4000, seed: int = 7):
    """95% bootstrap confidence interval of the median of xs (percentile
    method, fixed seed: the same data gives the same interval)."""
    import random
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return [meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]]


def rnd(x, n=2):
    return None if x is None else round(x, n)
