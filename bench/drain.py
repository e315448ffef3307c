#!/usr/bin/env python3
"""Lossless-drain benchmark: drover against gunicorn's and uvicorn's own masters.

For each contender the script starts the server on 127.0.0.1 (free ports),
waits until ``GET /`` answers 200, then runs a client load: K threads looping
``GET /sleep?ms=50``, each request on a NEW connection, plus 4 long requests
``GET /sleep?ms=1500`` started just before the stop. Half-way through the load
it sends SIGTERM to the top process (drover, or gunicorn's / uvicorn's master)
and keeps the load going until the whole process tree has exited. Every request
is classified:

ok                  200 answered
refused_before_stop connect refused before the stop was sent        (failure)
refused_after_stop  connect refused after the stop                  (expected)
pending_at_exit     SYN still unanswered when the tree had exited;
                    it can only end refused                         (expected)
connect_timeout     no SYN-ACK within the client timeout            (failure)
reset               connection established, then RST / EPIPE        (failure)
eof                 connection established, closed without answer   (failure)
timeout             connection established, no answer in time       (failure)
http_5xx / http_other / error   self-explanatory                    (failure)

A contender is *lossless* when it has no failure, its 4 long requests all got
200 and its whole process tree exited within the bound.

Python 3.11 standard library only. The venv is used only to run gunicorn and
uvicorn. Writes a markdown table to stdout and bench/results/drain.json; the
servers' own logs go to bench/results/drain-logs/.

    python3 bench/drain.py                 # the full comparison (a..f)
    python3 bench/drain.py --smoke         # CI: contenders a and b, 1 s load
    python3 bench/drain.py --only a,c      # a subset
"""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
RESULTS = REPO / "bench" / "results"
HOST = "127.0.0.1"

#: Hard bound on one contender, spawn to cleanup (seconds).
CONTENDER_BOUND = 30.0
#: Client timeout (connect and each read).
CLIENT_TIMEOUT = 10.0
#: Long requests.
LONG_COUNT = 4
LONG_MS = 1500
SHORT_MS = 50

FAILURE_CLASSES = (
    "refused_before_stop",
    "connect_timeout",
    "reset",
    "eof",
    "timeout",
    "http_5xx",
    "http_other",
    "error",
)
ALL_CLASSES = ("ok", "refused_after_stop", "pending_at_exit") + FAILURE_CLASSES


# --------------------------------------------------------------------------
# contenders


@dataclass
class Contender:
    key: str
    name: str
    argv: list[str]
    note: str = ""


def contenders(args: argparse.Namespace, port: int, admin: int) -> dict[str, Contender]:
    drover = str(args.drover)
    venv_bin = args.venv / "bin"
    gunicorn = str(venv_bin / "gunicorn")
    uvicorn = str(venv_bin / "uvicorn")
    fixtures = str(FIXTURES)
    base = [
        drover,
        "--host", HOST, "--port", str(port),
        "--admin-host", HOST, "--admin-port", str(admin),
        "--workers", "2",
    ]
    wsgi = [gunicorn, "-w", "1", "--chdir", fixtures, "wsgi_app:app"]
    return {
        "a": Contender("a", "drover built-in (2 workers)", base),
        "b": Contender("b", "drover + gunicorn -w 1 (x2, TERM)", base + ["--", *wsgi]),
        "c": Contender(
            "c",
            "drover + uvicorn --fd 3 (x2)",
            base + ["--", uvicorn, "--fd", "3", "--app-dir", fixtures, "asgi_app:app"],
        ),
        "d": Contender(
            "d",
            "gunicorn -w 2 (own master)",
            [gunicorn, "-w", "2", "-b", f"{HOST}:{port}", "--chdir", fixtures, "wsgi_app:app"],
        ),
        "e": Contender(
            "e",
            "uvicorn --workers 2 (own supervisor)",
            [uvicorn, "--workers", "2", "--host", HOST, "--port", str(port),
             "--app-dir", fixtures, "asgi_app:app"],
        ),
        "f": Contender(
            "f",
            "drover + gunicorn -w 1 (x2, QUIT)",
            base + ["--stop-signal", "QUIT", "--", *wsgi],
            note="informative: QUIT is gunicorn's *quick* shutdown",
        ),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("LISTEN_") or k.startswith("DROVER_"))
    }
    env["PATH"] = f"{args.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(args.venv)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)
    return env


# --------------------------------------------------------------------------
# process tree (/proc)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, starttime) of a live pid, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); starttime is field 22 -> rest[19]
    return rest[0], int(rest[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """Every descendant of pid as (pid, starttime), from /proc/*/task/*/children."""
    out: list[tuple[int, int]] = []
    todo = [pid]
    seen = {pid}
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
                if k in seen:
                    continue
                seen.add(k)
                st = _stat(k)
                if st is not None:
                    out.append((k, st[1]))
                    todo.append(k)
    return out


def still_running(procs: list[tuple[int, int]]) -> list[int]:
    """The pids of procs that still run (zombies count as exited)."""
    alive = []
    for pid, start in procs:
        st = _stat(pid)
        if st is None or st[1] != start or st[0] in ("Z", "X", "x"):
            continue
        alive.append(pid)
    return alive


def kill_tree(top: subprocess.Popen | None, known: list[tuple[int, int]]) -> None:
    """SIGKILL the top process, its process group and every descendant."""
    procs = list(known)
    if top is not None and top.poll() is None:
        procs += descendants(top.pid)
    if top is not None:
        try:
            os.killpg(top.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            top.kill()
        except OSError:
            pass
    for pid in still_running(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if top is not None:
        try:
            top.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------
# client


class Clock:
    """Shared timeline of one contender run (time.monotonic based)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.t_stop: float | None = None  # set just before the signal is sent
        self.t_exit: float | None = None
        self.end_load = threading.Event()  # no new requests after this
        self.abandon = threading.Event()  # tree exited: give up pending SYNs

    def rel(self, t: float | None) -> float | None:
        return None if t is None else round(t - self.t0, 4)

    def stopped_at(self, t: float) -> bool:
        return self.t_stop is not None and t >= self.t_stop


def one_request(port: int, path: str, clock: Clock) -> dict:
    """One GET on a new connection, classified."""
    rec: dict = {"path": path, "t_start": time.monotonic()}
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Connect without blocking so that a SYN the server silently drops
        # (full accept queue during a drain) can be abandoned once the tree
        # has exited instead of waiting for the next retransmission.
        s.setblocking(False)
        err = s.connect_ex((HOST, port))
        if err not in (0, errno.EINPROGRESS):
            return _connect_failed(rec, err, clock)
        if err == errno.EINPROGRESS:
            poller = select.poll()
            poller.register(s, select.POLLOUT)
            deadline = rec["t_start"] + CLIENT_TIMEOUT
            while True:
                if poller.poll(20):
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    break
                now = time.monotonic()
                if clock.abandon.is_set():
                    rec.update(cls="pending_at_exit", t_end=now)
                    return rec
                if now >= deadline:
                    rec.update(cls="connect_timeout", t_end=now)
                    return rec
            if err:
                return _connect_failed(rec, err, clock)
        rec["t_connected"] = time.monotonic()
        s.setblocking(True)
        s.settimeout(CLIENT_TIMEOUT)
        conn = http.client.HTTPConnection(HOST, port, timeout=CLIENT_TIMEOUT)
        conn.sock = s
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (ConnectionResetError, BrokenPipeError) as e:
            return _failed(rec, "reset", e)
        except (http.client.RemoteDisconnected, http.client.IncompleteRead,
                http.client.BadStatusLine, ConnectionAbortedError) as e:
            return _failed(rec, "eof", e)
        except (socket.timeout, TimeoutError) as e:
            return _failed(rec, "timeout", e)
        except Exception as e:  # noqa: BLE001 - classify anything else
            return _failed(rec, "error", e)
        finally:
            conn.close()
        rec["t_end"] = time.monotonic()
        rec["status"] = status
        if status == 200:
            rec["cls"] = "ok"
        elif status >= 500:
            rec["cls"] = "http_5xx"
        else:
            rec["cls"] = "http_other"
        return rec
    finally:
        s.close()


def _connect_failed(rec: dict, err: int, clock: Clock) -> dict:
    now = time.monotonic()
    rec["t_end"] = now
    rec["error"] = errno.errorcode.get(err, str(err))
    if err == errno.ECONNREFUSED:
        rec["cls"] = "refused_after_stop" if clock.stopped_at(now) else "refused_before_stop"
    elif err == errno.ETIMEDOUT:
        rec["cls"] = "connect_timeout"
    else:
        rec["cls"] = "error"
    return rec


def _failed(rec: dict, cls: str, e: BaseException) -> dict:
    rec.update(cls=cls, t_end=time.monotonic(), error=f"{type(e).__name__}: {e}")
    return rec


def loop_client(port: int, clock: Clock, sink: list, lock: threading.Lock) -> None:
    mine = []
    while not clock.end_load.is_set():
        rec = one_request(port, f"/sleep?ms={SHORT_MS}", clock)
        mine.append(rec)
        if rec["cls"] in ("refused_after_stop", "refused_before_stop", "error"):
            time.sleep(0.005)  # refusals are instant: do not spin
    with lock:
        sink.extend(mine)


def long_client(port: int, clock: Clock, sink: list, lock: threading.Lock) -> None:
    rec = one_request(port, f"/sleep?ms={LONG_MS}", clock)
    with lock:
        sink.append(rec)


def wait_ready(port: int, top: subprocess.Popen, deadline: float) -> float | None:
    """Polls GET / until 200; returns the time of the first 200, or None."""
    while time.monotonic() < deadline:
        if top.poll() is not None:
            return None
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=min(CLIENT_TIMEOUT, max(0.1, deadline - time.monotonic())))
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == 200:
                return time.monotonic()
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.02)
    return None


# --------------------------------------------------------------------------
# one contender


def run_contender(c: Contender, port: int, args: argparse.Namespace) -> dict:
    logs = RESULTS / "drain-logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{c.key}.log"
    result: dict = {
        "key": c.key,
        "name": c.name,
        "argv": c.argv,
        "note": c.note,
        "port": port,
        "log": os.path.relpath(log_path, REPO),
        "error": None,
    }
    top: subprocess.Popen | None = None
    known: list[tuple[int, int]] = []
    threads: list[threading.Thread] = []
    clock: Clock | None = None
    records: list[dict] = []
    long_records: list[dict] = []
    lock = threading.Lock()
    t_spawn = time.monotonic()
    bound = t_spawn + CONTENDER_BOUND
    try:
        with open(log_path, "wb") as log:
            top = subprocess.Popen(
                c.argv, cwd=REPO, env=child_env(args), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        ready_at = wait_ready(port, top, min(bound, t_spawn + 20))
        if ready_at is None:
            rc = top.poll()
            raise RuntimeError(
                f"never answered 200 on / (exit code {rc}); see {result['log']}"
            )
        result["ready_s"] = round(ready_at - t_spawn, 3)
        time.sleep(args.settle)  # let every worker boot; they share one socket

        clock = Clock()
        stop_at = clock.t0 + args.duration / 2
        for _ in range(args.clients):
            t = threading.Thread(target=loop_client, args=(port, clock, records, lock), daemon=True)
            t.start()
            threads.append(t)
        _sleep_until(stop_at - args.long_lead)
        for _ in range(LONG_COUNT):
            t = threading.Thread(target=long_client, args=(port, clock, long_records, lock), daemon=True)
            t.start()
            threads.append(t)
        _sleep_until(stop_at)

        if top.poll() is not None:
            raise RuntimeError(f"exited on its own before the stop (code {top.returncode})")
        known = descendants(top.pid)
        result["tree_before_stop"] = len(known) + 1
        clock.t_stop = time.monotonic()
        os.kill(top.pid, signal.SIGTERM)

        timed_out = False
        while True:
            if top.poll() is not None and not still_running(known):
                clock.t_exit = time.monotonic()
                break
            if time.monotonic() >= bound:
                timed_out = True
                break
            time.sleep(0.005)
        result["timed_out"] = timed_out
        if timed_out:
            result["still_running_at_bound"] = ([top.pid] if top.poll() is None else []) + still_running(known)
            kill_tree(top, known)
            clock.t_exit = time.monotonic()
        result["exit_code"] = top.returncode
        result["stop_to_exit_s"] = round(clock.t_exit - clock.t_stop, 3)
        # The load runs for --duration at least, and until the tree is gone.
        _sleep_until(min(clock.t0 + args.duration, bound))
        clock.end_load.set()
        clock.abandon.set()
        join_deadline = time.monotonic() + CLIENT_TIMEOUT + 2
        for t in threads:
            t.join(timeout=max(0.0, join_deadline - time.monotonic()))
        stuck = sum(t.is_alive() for t in threads)
        if stuck:
            result["stuck_client_threads"] = stuck
        result["load_s"] = round(time.monotonic() - clock.t0, 3)
    except Exception as e:  # noqa: BLE001 - report and clean up
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if clock is not None:
            clock.end_load.set()
            clock.abandon.set()
        kill_tree(top, known)
        leftovers = still_running(known)
        if leftovers:
            result["leftover_pids"] = leftovers
    if clock is not None:
        with lock:
            result.update(summarise(records, long_records, clock))
    return result


def _sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


def summarise(records: list[dict], long_records: list[dict], clock: Clock) -> dict:
    counts = {k: 0 for k in ALL_CLASSES}
    ok_connected_after_stop = 0
    failures = []
    for r in records:
        counts[r["cls"]] += 1
        if r["cls"] == "ok" and clock.t_stop is not None and r.get("t_connected", 0) >= clock.t_stop:
            ok_connected_after_stop += 1
        if r["cls"] in FAILURE_CLASSES:
            failures.append(r)
    long_out = []
    for r in long_records:
        long_out.append(_public(r, clock))
        if r["cls"] in FAILURE_CLASSES:
            failures.append(r)
    failures.sort(key=lambda r: r["t_start"])
    # When each class happened: 100 ms buckets of the end time, vs the stop.
    timeline: dict[str, dict[str, int]] = {}
    ref = clock.t_stop if clock.t_stop is not None else clock.t0
    for r in records + long_records:
        b = f"{int((r['t_end'] - ref) // 0.1) / 10:+.1f}"
        timeline.setdefault(b, {}).setdefault(r["cls"], 0)
        timeline[b][r["cls"]] += 1
    timeline = dict(sorted(timeline.items(), key=lambda kv: float(kv[0])))
    lost = sum(counts[k] for k in FAILURE_CLASSES)
    long_ok = sum(r["cls"] == "ok" for r in long_records)
    return {
        "requests": len(records),
        "counts": counts,
        "failures": lost,
        "ok_connected_after_stop": ok_connected_after_stop,
        "long": long_out,
        "long_ok": long_ok,
        "failure_samples": [_public(r, clock) for r in failures[:60]],
        "timeline_vs_stop": timeline,
        "t_stop_s": clock.rel(clock.t_stop),
        "t_exit_s": clock.rel(clock.t_exit),
    }


def _public(r: dict, clock: Clock) -> dict:
    """A record with times relative to the stop signal (seconds)."""
    ref = clock.t_stop if clock.t_stop is not None else clock.t0
    out = {"path": r["path"], "cls": r["cls"]}
    for k in ("t_start", "t_connected", "t_end"):
        if k in r:
            out[k + "_vs_stop"] = round(r[k] - ref, 4)
    for k in ("status", "error"):
        if k in r:
            out[k] = r[k]
    return out


# --------------------------------------------------------------------------
# output


def lossless(r: dict) -> bool:
    return (
        not r.get("error")
        and not r.get("timed_out")
        and r.get("failures", 1) == 0
        and r.get("long_ok", 0) == LONG_COUNT
        and not r.get("leftover_pids")
    )


def table(results: list[dict]) -> str:
    head = [
        "", "contender", "ready s", "requests", "ok", "refused<stop", "refused>stop",
        "pending@exit", "reset", "eof", "timeout", "5xx", "other", "long ok",
        "stop→exit s", "exit", "lossless",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("error") and "counts" not in r:
            lines.append(
                f"| {r['key']} | {r['name']} | " + " | ".join(["–"] * (len(head) - 4))
                + f" | ERROR: {r['error']} |"
            )
            continue
        c = r["counts"]
        other = c["http_other"] + c["error"] + c["connect_timeout"]
        exit_s = f"{r['stop_to_exit_s']:.3f}" if "stop_to_exit_s" in r else "–"
        if r.get("timed_out"):
            exit_s += " (killed at bound)"
        verdict = "yes" if lossless(r) else "**no**"
        if r.get("error"):
            verdict += f" (error: {r['error']})"
        lines.append(
            "| " + " | ".join(str(x) for x in [
                r["key"], r["name"], r.get("ready_s", "–"), r["requests"], c["ok"],
                c["refused_before_stop"], c["refused_after_stop"], c["pending_at_exit"],
                c["reset"], c["eof"], c["timeout"], c["http_5xx"], other,
                f"{r['long_ok']}/{LONG_COUNT}", exit_s, r.get("exit_code", "–"), verdict,
            ]) + " |"
        )
    return "\n".join(lines)


def versions(args: argparse.Namespace) -> dict:
    v: dict = {"python": platform.python_version(), "kernel": platform.release(),
               "cpus": os.cpu_count()}
    try:
        v["drover"] = subprocess.run([str(args.drover), "--version"], capture_output=True,
                                     text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        v["drover"] = f"unknown ({e})"
    try:
        v["venv"] = subprocess.run(
            [str(args.venv / "bin" / "python"), "-c",
             "import gunicorn, uvicorn; print(gunicorn.__version__, uvicorn.__version__)"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        v["venv"] = f"unknown ({e})"
    for name in ("somaxconn",):
        try:
            v[name] = int(Path(f"/proc/sys/net/core/{name}").read_text())
        except OSError:
            pass
    return v


# --------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drover", type=Path, default=REPO / "target" / "release" / "drover",
                   help="drover binary (default: target/release/drover)")
    p.add_argument("--venv", type=Path, default=REPO / "target" / "test-venv",
                   help="venv with gunicorn and uvicorn (default: target/test-venv)")
    p.add_argument("--duration", type=float, default=None,
                   help="client load in seconds; the stop is sent half-way (default 3, smoke 1)")
    p.add_argument("--smoke", action="store_true",
                   help="fast mode for CI: contenders a and b, 1 s load")
    p.add_argument("--only", default=None,
                   help="comma-separated contender keys (a-f); default a-f, smoke a,b")
    p.add_argument("--clients", type=int, default=16, help="looping client threads (16)")
    p.add_argument("--long-lead", type=float, default=0.2,
                   help="the long requests start this long before the stop (0.2 s)")
    p.add_argument("--settle", type=float, default=0.5,
                   help="pause after the first 200 so every worker is up (0.5 s)")
    p.add_argument("--json", type=Path, default=RESULTS / "drain.json", help="JSON output")
    args = p.parse_args(argv)
    args.drover = args.drover.resolve()
    args.venv = args.venv.absolute()
    if args.duration is None:
        args.duration = 1.0 if args.smoke else 3.0
    keys = (args.only or ("a,b" if args.smoke else "a,b,c,d,e,f")).split(",")
    keys = [k.strip() for k in keys if k.strip()]
    if args.smoke:
        args.settle = min(args.settle, 0.3)

    if not args.drover.is_file():
        print(f"drover binary not found: {args.drover} (cargo build --release)", file=sys.stderr)
        return 2
    needs_venv = any(k != "a" for k in keys)
    if needs_venv and not (args.venv / "bin" / "gunicorn").exists():
        print(f"no gunicorn in {args.venv}: python3 -m venv {args.venv} && "
              f"{args.venv}/bin/pip install gunicorn==27.0.1 uvicorn==0.54.0", file=sys.stderr)
        return 2

    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    started = time.monotonic()
    for k in keys:
        port, admin = free_port(), free_port()
        c = contenders(args, port, admin).get(k)
        if c is None:
            print(f"unknown contender {k!r}", file=sys.stderr)
            return 2
        print(f"[{k}] {c.name} ...", file=sys.stderr, flush=True)
        r = run_contender(c, port, args)
        results.append(r)
        brief = r.get("error") or (
            f"ok={r['counts']['ok']} failures={r['failures']} long_ok={r['long_ok']}/{LONG_COUNT} "
            f"stop→exit={r.get('stop_to_exit_s')}s exit={r.get('exit_code')}"
        )
        print(f"[{k}] {brief}", file=sys.stderr, flush=True)

    doc = {
        "benchmark": "drain",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(time.monotonic() - started, 2),
        "settings": {
            "smoke": args.smoke, "duration_s": args.duration, "stop_at_s": args.duration / 2,
            "clients": args.clients, "short_ms": SHORT_MS, "long_count": LONG_COUNT,
            "long_ms": LONG_MS, "long_lead_s": args.long_lead, "settle_s": args.settle,
            "client_timeout_s": CLIENT_TIMEOUT, "contender_bound_s": CONTENDER_BOUND,
            "drover": str(args.drover), "venv": str(args.venv),
        },
        "versions": versions(args),
        "classes": {"failure": list(FAILURE_CLASSES),
                    "expected": ["ok", "refused_after_stop", "pending_at_exit"]},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")

    print(f"### Lossless drain ({args.clients} clients x GET /sleep?ms={SHORT_MS} on new "
          f"connections, {LONG_COUNT} x /sleep?ms={LONG_MS} {args.long_lead:g} s before the "
          f"stop; SIGTERM at {args.duration / 2:g} s)\n")
    print(table(results))
    print(f"\nJSON: {args.json}")
    # Exit status for CI: 1 when drover's own app (a) was not lossless, or when
    # any contender could not be run, refused connections before the stop,
    # outlived the bound or left processes behind. Losses of the external
    # apps are what this benchmark measures, not a reason to fail.
    bad = [
        r["key"] for r in results
        if r.get("error") or r.get("timed_out") or r.get("leftover_pids")
        or r.get("counts", {}).get("refused_before_stop")
        or (r["key"] == "a" and not lossless(r))
    ]
    if bad:
        print(f"FAILED: {','.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
