#!/usr/bin/env python3
"""Data path: requests/s and p99 latency under wrk, drover against a baseline.

Four comparisons, each a pair run in the same invocation and alternated
(A B, B A, A B, ...; short runs, medians), so the machine's noise hits both:

builtin1  `examples/direct` (one current-thread event loop, no drover)
          vs `drover --workers 1` (the built-in app in-process).
          Both pinned to CPU 0 and wrk (-t1) to CPU 1 when there are >= 2
          CPUs, so the server has exactly one core and wrk cannot starve it.
builtin2  `direct --threads 2` (two event loops on one socket, one process)
          vs `drover --workers 2` (two worker processes on one socket).
          Unpinned; wrk -t2.
gunicorn  `gunicorn -w 2` bound by gunicorn vs drover --workers 2 running
          `gunicorn -w 1` per worker on the inherited socket (LISTEN_FDS).
uvicorn   `uvicorn --workers 2` vs drover --workers 2 running
          `uvicorn --fd 3` per worker, keep-alive. Both stall ~40 ms per
          response here: uvicorn's socket comes from socket.fromfd (proto 0),
          so asyncio never sets TCP_NODELAY, and Nagle meets the client's
          delayed ACK. The pair is latency-bound, not CPU-bound.
uvicorn_close  the same pair with `Connection: close` (a new connection
          per request; quick-ACK mode avoids the stall): CPU-bound.

Each group starts fresh processes --instances times (3) and splits its
--reps rounds (12) among them, so that the spread from one process instance
to the next (placement, memory layout) is part of what the medians see.
The ratio reported is drover / baseline: the median of the per-round ratios
(a round is one run of each, back to back) and, beside it, the ratio of the
medians. For p99, lower is better, so the p99 ratio is drover / baseline too.

Beside req/s, the server's CPU time per request: utime+stime of the whole
contender tree (supervisor included) over each run, from /proc, divided by
the requests wrk counted. On a shared, noisy machine other load steals wall
time from both sides unevenly, while CPU per request stays put: it tells
whether a req/s gap is drover's cost or the neighbours'. "server busy" is
that CPU time over the run's length, in cores: a pinned one-loop server well
below 1.0 means wrk, not the server, was the bottleneck.

The built-in groups have two more, informative contenders (not in a smoke
run), which split drover's extra CPU per request into its parts:
  builder   examples/direct --drover-builder: hyper's connection builder
            configured as drover's serve configures it (a tokio timer for a
            30 s header-read timeout, a 64 KiB buffer cap);
  external  drover --workers N -- examples/direct --fd 3: the direct server
            as drover's external command - N worker processes on drover's
            socket, drover off the data path: what processes instead of
            threads cost, with none of drover's per-request code.
The rest (drover --workers N minus those) is drover's own per-request work:
its connection wrapper, metrics recording, the boxed service and body.

usage: bench/throughput.py [--smoke] [--groups builtin1,builtin2,gunicorn,uvicorn,uvicorn_close]
                           [--reps N] [--duration S] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402


def groups(a):
    d, v, venv = a.drover, a.direct, a.venv
    pin = (os.cpu_count() or 1) >= 2 and not a.no_pin
    return {
        "builtin1": {
            "title": "built-in app, one event loop",
            "wrk": (1, 32), "pin": pin, "settle": 0.2,
            "baseline": ("direct (1 event loop)", lambda p, q: B.direct_argv(v, p, 1), None),
            "drover": ("drover --workers 1 (in-process)",
                       lambda p, q: B.drover_argv(d, p, q, 1), "admin"),
            "builder": ("direct --drover-builder (1 event loop)",
                        lambda p, q: B.direct_argv(v, p, 1) + ["--drover-builder"], None),
            "external": ("drover --workers 1 -- direct --fd 3",
                         lambda p, q: B.drover_argv(d, p, q, 1, "--", str(v), "--fd", "3"), "admin"),
        },
        "builtin2": {
            "title": "built-in app, two event loops",
            "wrk": (2, 64), "pin": False, "settle": 0.2,
            "baseline": ("direct --threads 2", lambda p, q: B.direct_argv(v, p, 2), None),
            "drover": ("drover --workers 2", lambda p, q: B.drover_argv(d, p, q, 2), "admin"),
            "builder": ("direct --threads 2 --drover-builder",
                        lambda p, q: B.direct_argv(v, p, 2) + ["--drover-builder"], None),
            "external": ("drover --workers 2 -- direct --fd 3",
                         lambda p, q: B.drover_argv(d, p, q, 2, "--", str(v), "--fd", "3"), "admin"),
        },
        "gunicorn": {
            "title": "WSGI app, gunicorn sync workers x2",
            "wrk": (1, 16), "pin": False, "settle": 1.5,
            "baseline": ("gunicorn -w 2", lambda p, q: B.gunicorn_own(venv, p, 2), None),
            "drover": ("drover --workers 2 -- gunicorn -w 1",
                       lambda p, q: B.drover_argv(d, p, q, 2, "--", *B.gunicorn_worker_cmd(venv)),
                       "admin"),
        },
        "uvicorn": {
            "title": "ASGI app, uvicorn x2, keep-alive",
            "wrk": (1, 16), "pin": False, "settle": 1.5,
            "baseline": ("uvicorn --workers 2", lambda p, q: B.uvicorn_own(venv, p, 2), None),
            "drover": ("drover --workers 2 -- uvicorn --fd 3",
                       lambda p, q: B.drover_argv(d, p, q, 2, "--", *B.uvicorn_worker_cmd(venv)),
                       "admin"),
        },
        "uvicorn_close": {
            "title": "ASGI app, uvicorn x2, a new connection per request",
            "wrk": (1, 16), "pin": False, "settle": 1.5, "headers": ("Connection: close",),
            "baseline": ("uvicorn --workers 2", lambda p, q: B.uvicorn_own(venv, p, 2), None),
            "drover": ("drover --workers 2 -- uvicorn --fd 3",
                       lambda p, q: B.drover_argv(d, p, q, 2, "--", *B.uvicorn_worker_cmd(venv)),
                       "admin"),
        },
    }


def start(name, make_argv, ready_on, pin, env, settle):
    port, admin = B.free_port(), B.free_port()
    argv = make_argv(port, admin)
    if pin:
        argv = ["taskset", "-c", "0"] + argv
    p = B.spawn(argv, env)
    B.wait_200(port, "/", timeout=30, p=p, poll=0.005)
    if ready_on == "admin":
        B.wait_200(admin, "/readyz", timeout=30, p=p, poll=0.005)
    # Let every worker finish booting (the first 200 needs only one).
    time.sleep(settle)
    return {"name": name, "p": p, "port": port, "argv": argv}


def conn_split(port: int) -> list[int]:
    """Established connections of the listening port per process, busiest
    first (threads of one process count as one)."""
    try:
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(collections.Counter(re.findall(r"pid=(\d+)", out)).values(), reverse=True)


SMOKE = False


def sides_of(g) -> list[str]:
    # The informative sides are left out of a smoke run (time).
    return [k for k in ("baseline", "drover") + (() if SMOKE else ("builder", "external")) if k in g]


def ratios(base: list[dict], other: list[dict], key: str) -> tuple:
    """Median and range of the per-round ratios other/base of key."""
    rs = [o[key] / b[key] for b, o in zip(base, other) if b.get(key) and o.get(key) is not None]
    if not rs:
        return None, [None, None]
    return B.rnd(B.median(rs), 4), [B.rnd(min(rs), 4), B.rnd(max(rs), 4)]


def run_instance(g, a, env, sides, rounds, runs, argvs, load):
    """Starts a fresh process (tree) of every side, warms each up, runs the
    given rounds alternating the sides, stops them."""
    threads, conns, cpus, hdrs = load
    procs = {}
    try:
        for side in sides:
            name, mk, ready_on = g[side]
            procs[side] = start(name, mk, ready_on, g["pin"], env,
                                g["settle"] / 3 if a.smoke else g["settle"])
            argvs[side] = procs[side]["argv"]
        # Warm-up, not recorded: page in, grow buffers, fill caches.
        for side in sides if a.warmup else ():
            B.wrk(procs[side]["port"], threads, conns, a.warmup, cpus=cpus, headers=hdrs)
        for i in rounds:
            # Rotate the order every round: each side goes first as often.
            k = i % len(sides)
            for side in sides[k:] + sides[:k]:
                pid = procs[side]["p"].pid
                c0, t0, k0 = B.tree_cpu_seconds(pid), B.cpu_seconds(pid), B.task_cpu(pid)
                snap = {}
                port = procs[side]["port"]
                probe = threading.Timer(min(0.5, a.duration / 2),
                                        lambda: snap.update(split=conn_split(port)))
                probe.start()
                r = B.wrk(port, threads, conns, a.duration, cpus=cpus, headers=hdrs)
                probe.join()
                r["conn_split"] = snap.get("split")
                k1 = B.task_cpu(pid)
                busy = sorted((k1[t] - k0.get(t, 0.0) for t in k1), reverse=True)
                tot = sum(busy) or 1.0
                # Share of the server's CPU per thread/process, busiest first.
                r["loop_cpu_shares"] = [round(x / tot, 3) for x in busy if x / tot >= 0.02]
                cpu = B.tree_cpu_seconds(pid) - c0
                # The top process alone: drover's supervisor (or, in-process,
                # the whole server), gunicorn's master, uvicorn's supervisor.
                r["top_cpu_s"] = round(B.cpu_seconds(pid) - t0, 3)
                r["server_cpu_s"] = round(cpu, 3)
                r["server_busy"] = round(cpu / max(1, round(a.duration)), 3)  # cores in use
                r["cpu_us_per_req"] = round(cpu / r["requests"] * 1e6, 3) if r["requests"] else None
                r["round"] = i
                runs[side].append(r)
                if procs[side]["p"].poll() is not None:
                    raise RuntimeError(f"{procs[side]['name']} exited during the run")
    finally:
        for pr in procs.values():
            if B.stop_tree(pr["p"]) is None:
                print(f"[throughput] {pr['name']} had to be killed", file=sys.stderr)


def run_group(key, g, a, env):
    threads, conns = g["wrk"]
    cpus = "1" if g["pin"] else None
    hdrs = g.get("headers", ())
    sides = sides_of(g)
    runs = {s: [] for s in sides}
    argvs = {}
    per = -(-a.reps // a.instances)
    for inst in range(a.instances):
        rounds = range(inst * per, min(a.reps, (inst + 1) * per))
        if rounds:
            run_instance(g, a, env, sides, rounds, runs, argvs, (threads, conns, cpus, hdrs))
    out = {"title": g["title"],
           "wrk": f"-t{threads} -c{conns} -d{a.duration:g}s" + "".join(f" -H '{h}'" for h in hdrs),
           "pinned": g["pin"], "sides": sides}
    for side in sides:
        rs = runs[side]
        out[side] = {
            "name": g[side][0], "argv": argvs[side],
            "rps_median": B.rnd(B.median([r["rps"] for r in rs]), 1),
            "p99_ms_median": B.rnd(B.median([r["p99_ms"] for r in rs if "p99_ms" in r]), 3),
            "p50_ms_median": B.rnd(B.median([r["p50_ms"] for r in rs if "p50_ms" in r]), 3),
            "cpu_us_per_req_median": B.rnd(B.median([r["cpu_us_per_req"] for r in rs
                                                     if r["cpu_us_per_req"] is not None]), 3),
            "server_busy_median": B.rnd(B.median([r["server_busy"] for r in rs]), 3),
            "top_cpu_s_median": B.rnd(B.median([r["top_cpu_s"] for r in rs]), 3),
            # Per-process split of wrk's connections, read half-way through
            # each run (keep-alive runs only: with a new connection per
            # request it is a snapshot of a churn).
            "conn_splits": [r["conn_split"] for r in rs],
            "busiest_loop_share_median": B.rnd(B.median([r["loop_cpu_shares"][0] for r in rs
                                                         if r["loop_cpu_shares"]]), 3),
            "errors": sum(sum(r["socket_errors"].values()) + r["non_2xx"] for r in rs),
            "runs": rs,
        }
        if side != "baseline":
            rr, rrange = ratios(runs["baseline"], rs, "rps")
            cr, crange = ratios(runs["baseline"], rs, "cpu_us_per_req")
            pr_, _ = ratios(runs["baseline"], rs, "p99_ms")
            out[side].update(rps_ratio=rr, rps_ratio_range=rrange, cpu_ratio=cr,
                             cpu_ratio_range=crange, p99_ratio=pr_)
    d = out["drover"]
    # The drover-vs-baseline figures, at the top level too.
    for k in ("rps_ratio", "rps_ratio_range", "cpu_ratio", "cpu_ratio_range", "p99_ratio"):
        out[k] = d[k]
    out["rps_ratio_of_medians"] = B.rnd(d["rps_median"] / out["baseline"]["rps_median"], 4)
    # Run-to-run spread of the baseline against itself: how big a difference
    # this machine can resolve right now.
    bs = [r["rps"] for r in runs["baseline"]]
    out["baseline_spread"] = B.rnd((max(bs) - min(bs)) / B.median(bs), 4)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drover", type=Path, default=B.DEFAULT_DROVER)
    ap.add_argument("--direct", type=Path, default=B.DEFAULT_DIRECT)
    ap.add_argument("--venv", type=Path, default=B.DEFAULT_VENV)
    ap.add_argument("--groups", default=None,
                    help="default builtin1,builtin2,gunicorn,uvicorn,uvicorn_close; "
                         "smoke: all but uvicorn (keep-alive)")
    ap.add_argument("--smoke", action="store_true", help="1 s runs, 2 rounds")
    ap.add_argument("--reps", type=int, default=None, help="rounds per group (default 12; smoke 2)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per wrk run (default 2; smoke 1)")
    ap.add_argument("--instances", type=int, default=None,
                    help="fresh processes per side, the rounds split among them (default 3; smoke 1): "
                         "the spread between instances is part of the noise")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the one-loop pair")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    global SMOKE
    SMOKE = a.smoke
    a.reps = a.reps or (2 if a.smoke else 12)
    a.instances = a.instances or (1 if a.smoke else 3)
    a.duration = a.duration or (1 if a.smoke else 2)
    a.warmup = 0 if a.smoke else 1
    a.drover, a.direct, a.venv = a.drover.resolve(), a.direct.resolve(), a.venv.absolute()
    env = B.child_env(a.venv)
    gs = groups(a)
    a.groups = a.groups or ("builtin1,builtin2,gunicorn,uvicorn_close" if a.smoke else ",".join(gs))
    results = {}
    for key in a.groups.split(","):
        print(f"[throughput] {key}: {gs[key]['title']} ...", file=sys.stderr, flush=True)
        results[key] = r = run_group(key, gs[key], a, env)
        print(f"[throughput] {key}: drover/baseline rps {r['rps_ratio']} "
              f"(range {r['rps_ratio_range']}), p99 {r['p99_ratio']}, CPU/request {r['cpu_ratio']} "
              f"(range {r['cpu_ratio_range']})", file=sys.stderr, flush=True)
    print("| group | contender | req/s | ratio | p99 | server CPU µs/req | ratio | server busy (cores) |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        for side in r["sides"]:
            x = r[side]
            rr = "1 (baseline)" if side == "baseline" else f"{x['rps_ratio']:.3f}"
            cr = "1 (baseline)" if side == "baseline" else f"{x['cpu_ratio']:.3f}"
            print(f"| {key} | {x['name']} | {x['rps_median']:.0f} | {rr} | {x['p99_ms_median']} ms | "
                  f"{x['cpu_us_per_req_median']} | {cr} | {x['server_busy_median']} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"settings": {"reps": a.reps, "duration_s": a.duration,
                                                   "instances": a.instances},
                                      "groups": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
