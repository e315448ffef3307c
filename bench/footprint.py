#!/usr/bin/env python3
"""Footprint: resident memory of drover's supervisor and workers, idle and
after load, against Python supervisors; and drover's binary size.

drover --workers 2 (built-in app): VmRSS (from /proc/<pid>/status; RssAnon
and Pss beside it) of the supervisor and of each worker
  idle       /readyz 200, then 0.5 s quiet, no request served yet
  after N    after wrk (-t1 -c16, keep-alive) served >= N requests (counted
             from wrk's own output), plus 10 /metrics scrapes
  after 2N, 3N  after further batches of >= N (--batches, default 3):
             growth from the first batch on is what a leak looks like;
             growth from idle to the first batch is code pages faulted in,
             buffers and allocator arenas filling once.
  soak       then the load stays on until --soak requests in all (3 000 000),
             one reading per 3 s wrk run: memory that levels off is the
             allocator settling; memory that keeps climbing is a leak.
The same readings for examples/direct (the built-in app without drover), and
idle readings of gunicorn -w 2's and uvicorn --workers 2's supervisor and
workers, and of drover's supervisor with 2 gunicorn workers under it.

usage: bench/footprint.py [--smoke] [--requests 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402


def mem(pid: int) -> dict:
    """VmRSS, RssAnon (kB, /proc/pid/status) and Pss (kB, smaps_rollup)."""
    out = {"pid": pid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0])
    except OSError:
        return out
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1])
    except OSError:
        pass
    # Resident pages of the executable's own file mappings (its code and
    # read-only data): shared between a supervisor and its workers.
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        rss_exe, current = 0, None
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    parts = line.split()
                    current = parts[5] if len(parts) > 5 else None
                elif first == "Rss:" and current == exe:
                    rss_exe += int(line.split()[1])
        out["RssExe"] = rss_exe
    except OSError:
        pass
    return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def load(port: int, n: int, seconds: int) -> int:
    """wrk until at least n requests were answered; returns the count."""
    done = 0
    while done < n:
        r = B.wrk(port, 1, 16, seconds)
        if r["socket_errors"] and sum(r["socket_errors"].values()) or r["non_2xx"]:
            raise RuntimeError(f"wrk saw errors: {r}")
        done += r["requests"]
    return done


def scrape(admin: int, times: int) -> None:
    for _ in range(times):
        assert B.get(admin, "/metrics", timeout=5)[0] == 200


def snapshot(sup: int, workers: list[int]) -> dict:
    return {"supervisor": mem(sup), "workers": [mem(w) for w in workers]}


def soak(a, port: int, total: int, snap, admin) -> list[dict]:
    """Keeps the load on until --soak requests in all, one reading per wrk
    run: where the memory levels off (allocator) or keeps climbing (leak)."""
    samples = []
    while a.soak and total < a.soak:
        r = B.wrk(port, 1, 16, 3)
        if sum(r["socket_errors"].values()) or r["non_2xx"]:
            raise RuntimeError(f"wrk saw errors: {r}")
        total += r["requests"]
        if admin:
            scrape(admin, 2)
        time.sleep(0.2)
        samples.append({"requests": total, "mem": snap()})
    return samples


def phases(a) -> list[str]:
    return ["idle"] + [f"after_{i + 1}" for i in range(a.batches)]


def drover_builtin(a, env) -> dict:
    port, admin = B.free_port(), B.free_port()
    p = B.spawn(B.drover_argv(a.drover, port, admin, 2), env)
    try:
        B.wait_200(admin, "/readyz", timeout=30, p=p, poll=0.005)
        time.sleep(0.5)
        workers = children(p.pid)
        out = {"workers_pids": workers, "phases": phases(a), "idle": snapshot(p.pid, workers)}
        total = 0
        for ph in out["phases"][1:]:
            total += load(port, a.requests, a.wrk_seconds)
            scrape(admin, 10)
            time.sleep(0.3)
            out[ph] = snapshot(p.pid, workers)
            out[ph]["requests"] = total
        out["soak"] = soak(a, port, total, lambda: snapshot(p.pid, workers), admin)
        if sorted(children(p.pid)) != sorted(workers):
            raise RuntimeError("a worker was replaced during the run (restart?)")
        return out
    finally:
        B.stop_tree(p)


def direct(a, env) -> dict:
    port = B.free_port()
    p = B.spawn(B.direct_argv(a.direct, port, 1), env)
    try:
        B.wait_200(port, "/", timeout=10, p=p, poll=0.005)
        time.sleep(0.5)
        out = {"phases": phases(a), "idle": mem(p.pid)}
        total = 0
        for ph in out["phases"][1:]:
            total += load(port, a.requests, a.wrk_seconds)
            time.sleep(0.3)
            out[ph] = dict(mem(p.pid), requests=total)
        out["soak"] = soak(a, port, total, lambda: mem(p.pid), None)
        return out
    finally:
        B.stop_tree(p)


def python_idle(name, argv, a, env, port, admin=None) -> dict:
    p = B.spawn(argv, env)
    try:
        B.wait_200(port, "/", timeout=30, p=p, poll=0.01)
        if admin:
            B.wait_200(admin, "/readyz", timeout=30, p=p, poll=0.01)
        time.sleep(0.7 if a.smoke else 1.5)  # every worker booted and idle
        kids = children(p.pid)
        out = {"name": name, "supervisor": mem(p.pid), "workers": [mem(k) for k in kids]}
        # drover + gunicorn: each worker is a gunicorn master with one child.
        grandkids = [g for k in kids for g in children(k)]
        if grandkids:
            out["grandchildren"] = [mem(g) for g in grandkids]
        return out
    finally:
        B.stop_tree(p)


def binary(path: Path) -> dict:
    info = subprocess.run(["file", "-L", str(path)], capture_output=True, text=True).stdout.strip()
    out = {"path": str(path), "bytes": path.stat().st_size, "file": info,
           "stripped": ", stripped" in info}
    return out


def mb(kb):
    return None if kb is None else round(kb / 1024, 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drover", type=Path, default=B.DEFAULT_DROVER)
    ap.add_argument("--direct", type=Path, default=B.DEFAULT_DIRECT)
    ap.add_argument("--venv", type=Path, default=B.DEFAULT_VENV)
    ap.add_argument("--requests", type=int, default=None, help="per batch (default 100000; smoke 5000)")
    ap.add_argument("--batches", type=int, default=None, help="load batches (default 3; smoke 2)")
    ap.add_argument("--soak", type=int, default=None,
                    help="then keep loading until this many requests in all (default 3000000; smoke 0)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.batches = a.batches or (2 if a.smoke else 3)
    a.soak = a.soak if a.soak is not None else (0 if a.smoke else 3_000_000)
    a.requests = a.requests or (5000 if a.smoke else 100_000)
    a.wrk_seconds = 1
    a.drover, a.direct, a.venv = a.drover.resolve(), a.direct.resolve(), a.venv.absolute()
    env = B.child_env(a.venv)

    res = {"requests_per_batch": a.requests}
    print("[footprint] drover --workers 2 ...", file=sys.stderr, flush=True)
    res["drover"] = drover_builtin(a, env)
    print("[footprint] direct ...", file=sys.stderr, flush=True)
    res["direct"] = direct(a, env)
    print("[footprint] Python supervisors ...", file=sys.stderr, flush=True)
    port = B.free_port()
    res["gunicorn"] = python_idle("gunicorn -w 2", B.gunicorn_own(a.venv, port, 2), a, env, port)
    port = B.free_port()
    res["uvicorn"] = python_idle("uvicorn --workers 2", B.uvicorn_own(a.venv, port, 2), a, env, port)
    port, admin = B.free_port(), B.free_port()
    res["drover_gunicorn"] = python_idle(
        "drover --workers 2 -- gunicorn -w 1",
        B.drover_argv(a.drover, port, admin, 2, "--", *B.gunicorn_worker_cmd(a.venv)),
        a, env, port, admin)
    res["binary"] = binary(a.drover)
    res["binary_direct"] = binary(a.direct)

    d = res["drover"]
    rows = []
    for ph in d["phases"]:
        label = "idle" if ph == "idle" else f"after {d[ph]['requests']} req"
        rows.append((f"drover supervisor, {label}", d[ph]["supervisor"]))
        for i, w in enumerate(d[ph]["workers"]):
            rows.append((f"drover worker {i}, {label}", w))
    dr = res["direct"]
    for ph in dr["phases"]:
        label = "idle" if ph == "idle" else f"after {dr[ph]['requests']} req"
        rows.append((f"direct (no drover), {label}", dr[ph]))
    for key in ("gunicorn", "uvicorn", "drover_gunicorn"):
        r = res[key]
        rows.append((f"{r['name']}: supervisor, idle", r["supervisor"]))
        for i, w in enumerate(r["workers"]):
            rows.append((f"{r['name']}: child {i}, idle", w))
        for i, w in enumerate(r.get("grandchildren", [])):
            rows.append((f"{r['name']}: grandchild {i}, idle", w))
    print("| process | VmRSS MiB | RssAnon MiB | RssFile MiB (of which the executable) | Pss MiB |")
    print("|---|---|---|---|---|")
    for label, m in rows:
        print(f"| {label} | {mb(m.get('VmRSS'))} | {mb(m.get('RssAnon'))} | "
              f"{mb(m.get('RssFile'))} ({mb(m.get('RssExe'))}) | {mb(m.get('Pss'))} |")
    for key in ("drover", "direct"):
        sk = res[key].get("soak") or []
        if sk:
            def anon(m):
                return [m["supervisor"]["RssAnon"]] + [w["RssAnon"] for w in m["workers"]] if "supervisor" in m else [m["RssAnon"]]
            print(f"\n{key} soak, RssAnon kB per process: " + "; ".join(
                f"{x['requests']}: {anon(x['mem'])}" for x in sk))
    b = res["binary"]
    print(f"\ndrover binary: {b['bytes'] / 1e6:.2f} MB ({'stripped' if b['stripped'] else 'NOT stripped'}); "
          f"examples/direct: {res['binary_direct']['bytes'] / 1e6:.2f} MB")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
