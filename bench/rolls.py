#!/usr/bin/env python3
"""Rolls under load, and gunicorn's memory trade-off (issue 11).

Part 1, HUP under steady load with an app that takes 2 s to boot
(tests/fixtures/servers/slowboot.py, BOOT_SECONDS=2), 2 workers:
  drover+uvicorn            drover --workers 2 -- uvicorn --fd 3 slowboot:asgi
                            (no sd_notify: up once seen accepting)
  drover+gunicorn --preload drover --workers 2 -- gunicorn -w 1 --preload slowboot:wsgi
                            (READY=1 after the app is imported)
  drover+gunicorn           the same without --preload (READY=1 before the
                            worker imports the app: shown, not recommended)
  gunicorn                  gunicorn -w 2 -b ... slowboot:wsgi, HUP to its master
  uvicorn                   uvicorn --workers 2 ... slowboot:asgi, HUP to its
                            supervisor (uvicorn >= 0.30 restarts its workers)
The load: 2 client threads, each `GET /` on a new connection every 10 ms,
latency measured per request (connect to last byte, 5 s timeout = failure),
from 1 s before the HUP to 7 s after it (a 2 × 2 s roll and a margin).
Reports requests, failures, max and p99 latency; median over the reps.

Part 2, the whole tree's PSS (sum of Pss in /proc/PID/smaps_rollup over
the top process and every descendant) for 4 gunicorn sync workers, after
200 requests:
  drover --workers 4 -- gunicorn -w 1     four masters, one worker each
  drover --workers 1 -- gunicorn -w 4     one master, four workers
  drover --workers 1 -- gunicorn -w 4 --preload
  gunicorn -w 4                           no drover

usage: bench/rolls.py [--smoke] [--reps N] [--json out.json]
(bench/run runs it, and `bench/run --smoke` its smoke form, unless --parts
is given.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402

SERVERS = B.FIXTURES / "servers"
PYTHONPATH = f"{SERVERS}:{B.FIXTURES}"


def env_for(venv: Path, boot: str = "0") -> dict[str, str]:
    env = B.child_env(venv)
    env["PYTHONPATH"] = PYTHONPATH
    env["BOOT_SECONDS"] = boot
    return env


def roll_argv(name: str, a, port: int, admin: int) -> list[str]:
    v = a.venv / "bin"
    gunicorn_1 = [str(v / "gunicorn"), "-w", "1", "--no-control-socket", "--log-level", "warning"]
    return {
        "drover+uvicorn": lambda: B.drover_argv(
            a.drover, port, admin, 2, "--", str(v / "uvicorn"), "--fd", "3", "--log-level",
            "warning", "slowboot:asgi"),
        "drover+gunicorn --preload": lambda: B.drover_argv(
            a.drover, port, admin, 2, "--", *gunicorn_1, "--preload", "slowboot:wsgi"),
        "drover+gunicorn": lambda: B.drover_argv(
            a.drover, port, admin, 2, "--", *gunicorn_1, "slowboot:wsgi"),
        "gunicorn": lambda: [str(v / "gunicorn"), "-w", "2", "-b", f"{B.HOST}:{port}",
                             "--no-control-socket", "--log-level", "warning", "slowboot:wsgi"],
        "uvicorn": lambda: [str(v / "uvicorn"), "--workers", "2", "--host", B.HOST, "--port",
                            str(port), "--log-level", "warning", "slowboot:asgi"],
    }[name]()


def one_request(port: int, errors: list[str]) -> float | None:
    """Seconds for one GET / on a new connection, or None if it failed
    (what went wrong appended to errors)."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection((B.HOST, port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        if not buf.startswith(b"HTTP/1.1 200"):
            errors.append(f"answer {buf[:40]!r}")
            return None
    except OSError as e:
        errors.append(f"{type(e).__name__}: {e}")
        return None
    return time.perf_counter() - t0


def roll_once(name: str, a) -> dict:
    port, admin = B.free_port(), B.free_port()
    p = B.spawn(roll_argv(name, a, port, admin), env_for(a.venv, "2"))
    try:
        B.wait_200(port, timeout=60, p=p)
        if name.startswith("drover"):
            B.wait_200(admin, "/readyz", timeout=60, p=p)
        else:
            time.sleep(2.5)  # every worker of its own supervisor has booted
        results: list[float | None] = []
        errors: list[str] = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                results.append(one_request(port, errors))
                time.sleep(0.01)

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        p.send_signal(signal.SIGHUP)
        time.sleep(7.0)
        stop.set()
        for t in threads:
            t.join()
        ok = sorted(r for r in results if r is not None)
        failed = sum(1 for r in results if r is None)
        return {
            "requests": len(results),
            "failed": failed,
            "max_ms": round(1000 * max(ok), 1) if ok else None,
            "p99_ms": round(1000 * ok[int(0.99 * (len(ok) - 1))], 1) if ok else None,
            "alive": p.poll() is None,
            "errors": errors,
        }
    finally:
        B.stop_tree(p)


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def footprint_once(name: str, a) -> dict:
    port, admin = B.free_port(), B.free_port()
    v = a.venv / "bin"
    g = [str(v / "gunicorn"), "--no-control-socket", "--log-level", "warning"]
    argv = {
        "drover 4 × gunicorn -w 1": B.drover_argv(a.drover, port, admin, 4, "--", *g, "-w", "1",
                                                  "wsgi_app:app"),
        "drover 1 × gunicorn -w 4": B.drover_argv(a.drover, port, admin, 1, "--", *g, "-w", "4",
                                                  "wsgi_app:app"),
        "drover 1 × gunicorn -w 4 --preload": B.drover_argv(
            a.drover, port, admin, 1, "--", *g, "-w", "4", "--preload", "wsgi_app:app"),
        "gunicorn -w 4": [*g, "-w", "4", "-b", f"{B.HOST}:{port}", "wsgi_app:app"],
    }[name]
    p = B.spawn(argv, env_for(a.venv))
    try:
        B.wait_200(port, timeout=60, p=p)
        deadline = time.perf_counter() + 30
        # 1 + 4 (gunicorn -w 4) or 1 + 4 + 4 (four masters) processes.
        want = 9 if name.startswith("drover 4") else 5 if name.startswith("gunicorn") else 6
        while len([p.pid] + B.descendants(p.pid)) < want and time.perf_counter() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        for _ in range(200):
            B.get(port)
        tree = [p.pid] + B.descendants(p.pid)
        return {"processes": len(tree), "pss_mib": round(sum(pss_kb(x) for x in tree) / 1024, 1)}
    finally:
        B.stop_tree(p)


ROLLS = ["drover+uvicorn", "drover+gunicorn --preload", "drover+gunicorn", "gunicorn", "uvicorn"]
FOOTPRINTS = ["drover 4 × gunicorn -w 1", "drover 1 × gunicorn -w 4",
              "drover 1 × gunicorn -w 4 --preload", "gunicorn -w 4"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drover", type=Path, default=B.DEFAULT_DROVER)
    ap.add_argument("--venv", type=Path, default=B.DEFAULT_VENV)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="one rep of drover+uvicorn's roll only")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", help="comma-separated contenders of the roll part (skips the PSS part)")
    a = ap.parse_args()
    rolls, foots, reps = (["drover+uvicorn"], [], 1) if a.smoke else (ROLLS, FOOTPRINTS, a.reps)
    if a.only:
        rolls, foots = a.only.split(","), []

    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rolls": {}, "pss": {},
           "load_before": os.getloadavg()}
    for rep in range(reps):
        for name in rolls[rep % len(rolls):] + rolls[:rep % len(rolls)]:
            r = roll_once(name, a)
            out["rolls"].setdefault(name, []).append(r)
            print(f"rolls: {name:28} rep {rep}: {r}", file=sys.stderr)
        for name in foots:
            r = footprint_once(name, a)
            out["pss"].setdefault(name, []).append(r)
            print(f"pss:   {name:36} rep {rep}: {r}", file=sys.stderr)

    out["load_after"] = os.getloadavg()
    print(f"\n### HUP under load, 2 s boot, 2 workers ({out['date']}; median of {reps}; "
          f"load average {out['load_before'][0]:.1f} → {out['load_after'][0]:.1f})\n")
    print("| contender | requests | failed | max latency (ms) | p99 (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in out["rolls"].items():
        med = lambda k: B.median([r[k] for r in rs if r[k] is not None])  # noqa: E731
        worst_failed = max(r["failed"] for r in rs)
        print(f"| {name} | {med('requests'):.0f} | {med('failed'):.0f} (worst {worst_failed}) "
              f"| {med('max_ms'):.0f} | {med('p99_ms'):.0f} |")
    if out["pss"]:
        print(f"\n### gunicorn, 4 sync workers: whole tree PSS after 200 requests (median of {reps})\n")
        print("| layout | processes | PSS (MiB) |")
        print("|---|---:|---:|")
        for name, rs in out["pss"].items():
            print(f"| {name} | {rs[0]['processes']} | {B.median([r['pss_mib'] for r in rs]):.1f} |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    bad = [n for n, rs in out["rolls"].items() if not all(r["alive"] for r in rs)]
    if bad:
        print(f"rolls: {bad} did not survive the HUP", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
