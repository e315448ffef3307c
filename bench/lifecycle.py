#!/usr/bin/env python3
"""drover lifecycle timings: time to ready and stop latency.

time to ready: from spawn to the first 200 on `/` (built-in app), for 1, 2
and 8 workers. stop latency: from `POST /admin/stop` (or SIGTERM) to the
whole process tree gone, idle, `--drain-delay 0`, for 1, 2 and 8 workers.
Each figure is the median (and p90) of --reps runs. Loopback only.

usage: bench/lifecycle.py [--drover target/release/drover] [--reps 20] [--json out.json]
"""
import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return False


def get(port, path="/", method="GET", timeout=2.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def start(drover, workers):
    port, admin = free_port(), free_port()
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [drover, "--host", "127.0.0.1", "--port", str(port), "--admin-host", "127.0.0.1",
         "--admin-port", str(admin), "--workers", str(workers), "--drain-delay", "0",
         "--log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = t0 + 10
    while True:
        try:
            if get(port, timeout=0.5) == 200:
                break
        except OSError:
            pass
        if time.perf_counter() > deadline:
            p.kill()
            raise RuntimeError("drover did not answer")
        time.sleep(0.0005)
    ready = time.perf_counter() - t0
    # Wait until every worker is up, so the stop measures an idle pod.
    while get(admin, "/readyz") != 200:
        time.sleep(0.001)
    return p, port, admin, ready


def stop(p, admin, how):
    tree = [p.pid] + descendants(p.pid)
    t0 = time.perf_counter()
    if how == "http":
        assert get(admin, "/admin/stop", "POST") == 202
    else:
        os.kill(p.pid, signal.SIGTERM)
    p.wait(timeout=10)
    while any(alive(x) for x in tree[1:]):
        time.sleep(0.0002)
    took = time.perf_counter() - t0
    assert p.returncode == 0, p.returncode
    return took


def summary(xs):
    xs = sorted(xs)
    p90 = xs[max(0, -(-len(xs) * 9 // 10) - 1)]  # nearest rank
    return {"median_ms": round(statistics.median(xs) * 1000, 2), "p90_ms": round(p90 * 1000, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--drover", default="target/release/drover")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--workers", default="1,2,8")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    for w in [int(x) for x in a.workers.split(",")]:
        ready, by_http, by_term = [], [], []
        for i in range(a.reps):
            p, port, admin, r = start(a.drover, w)
            ready.append(r)
            if i % 2 == 0:
                by_http.append(stop(p, admin, "http"))
            else:
                by_term.append(stop(p, admin, "term"))
        rows.append({"workers": w, "time_to_ready": summary(ready),
                     "stop_http": summary(by_http), "stop_sigterm": summary(by_term or by_http)})
    print("| workers | time to first 200 (median / p90) | POST /admin/stop → tree gone | SIGTERM → tree gone |")
    print("|---|---|---|---|")
    for r in rows:
        f = lambda s: f"{s['median_ms']} ms / {s['p90_ms']} ms"
        print(f"| {r['workers']} | {f(r['time_to_ready'])} | {f(r['stop_http'])} | {f(r['stop_sigterm'])} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    sys.exit(main())
