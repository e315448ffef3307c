#!/usr/bin/env python3
"""Real traffic: the data path with traffic shaped like production's (issue 12).

Three parts, each a ratio or a share measured in this one invocation:

1. balance - 4 workers, keep-alive pools of 4/8/16/64 connections opened at
   once by wrk (-t1, 1 s): the busiest worker's share of the connections
   (`ss -tnp`, per process, half-way through; ideal 0.25, goal <= 0.3125),
   median over trials, for drover's built-in app and drover + uvicorn, each
   with --balance shared and reuseport, and for uvicorn's and gunicorn's own
   --workers 4. Also for a pool that grows one connection at a time (16
   connections 20 ms apart; what a proxy does as its traffic grows).
2. parity - keep-alive (wrk -c50) and new-connection (Connection: close)
   requests/s of drover --workers 2 -- SERVER against SERVER's own
   --workers 2, for uvicorn, gunicorn (-k asgi) and hypercorn: runs
   alternate, the ratio's median and 95 % interval over trials.
3. scaling - the built-in app's CPU-bound handler (/work?ms=2) under 8
   keep-alive connections: requests/s of --workers 2 over --workers 1
   (goal >= 1.6 on 2 cores).

usage: bench/traffic.py [--smoke] [--trials N] [--parts balance,parity,scaling] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402


def burst_shares(port: int, conns: int, trials: int, workers: int) -> dict:
    shares, splits = [], []
    for _ in range(trials):
        box = {}
        t = threading.Thread(target=lambda: box.update(r=B.wrk(port, 1, conns, 1)))
        t.start()
        time.sleep(0.5)
        s = B.established_per_pid(port)
        t.join()
        if "r" not in box:
            raise RuntimeError("wrk failed")
        s = (s + [0] * workers)[:workers]
        splits.append(s)
        shares.append(s[0] / max(1, sum(s)))
        time.sleep(0.2)
    return {"splits": splits, "share": B.rnd(B.median(shares), 3)}


def grown_shares(port: int, conns: int, trials: int, workers: int) -> dict:
    shares, splits = [], []
    for _ in range(trials):
        keep = []
        for _ in range(conns):
            s = socket.create_connection((B.HOST, port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(65536)
            keep.append(s)
            time.sleep(0.02)
        split = (B.established_per_pid(port) + [0] * workers)[:workers]
        for s in keep:
            s.close()
        splits.append(split)
        shares.append(split[0] / max(1, sum(split)))
        time.sleep(0.2)
    return {"splits": splits, "share": B.rnd(B.median(shares), 3)}


class Running:
    """A contender started in its own session, stopped on exit."""

    def __init__(self, argv, env, port, admin=None, settle=0.3):
        self.p = B.spawn(argv, env)
        self.port = port
        try:
            B.wait_200(port, "/", timeout=40, p=self.p, poll=0.005)
            if admin:
                B.wait_200(admin, "/readyz", timeout=40, p=self.p, poll=0.005)
            time.sleep(settle)
        except BaseException:
            B.kill_tree(self.p)
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if B.stop_tree(self.p) is None:
            B.kill_tree(self.p)


def hypercorn_env(env):
    e = dict(env)
    e["PYTHONPATH"] = str(B.FIXTURES)
    return e


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drover", type=Path, default=B.DEFAULT_DROVER)
    ap.add_argument("--venv", type=Path, default=B.DEFAULT_VENV)
    ap.add_argument("--trials", type=int, default=None, help="default 5; smoke 1")
    ap.add_argument("--parts", default="balance,parity,scaling")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    trials = a.trials or (1 if a.smoke else 5)
    parts = a.parts.split(",")
    a.drover, a.venv = a.drover.resolve(), a.venv.absolute()
    env = B.child_env(a.venv)
    v = a.venv / "bin"
    drover = lambda p, q, w, *x: B.drover_argv(a.drover, p, q, w, *x)  # noqa: E731
    uvicorn_w = B.uvicorn_worker_cmd(a.venv)
    asgi_gunicorn_w = [str(v / "gunicorn"), "-w", "1", "-k", "asgi", "--chdir", str(B.FIXTURES),
                       "--log-level", "warning", "asgi_app:app"]
    hypercorn_w = [str(v / "hypercorn"), "--bind", "fd://3", "--log-level", "warning", "asgi_app:app"]
    report: dict = {"trials": trials}

    if "balance" in parts:
        conns = [16] if a.smoke else [4, 8, 16, 64]
        n = 4
        contenders = [
            ("drover (built-in), shared", lambda p, q: drover(p, q, n), True),
            ("drover (built-in), reuseport", lambda p, q: drover(p, q, n, "--balance", "reuseport"), True),
            ("drover -- uvicorn, shared", lambda p, q: drover(p, q, n, "--", *uvicorn_w), True),
            ("drover -- uvicorn, reuseport",
             lambda p, q: drover(p, q, n, "--balance", "reuseport", "--", *uvicorn_w), True),
            ("uvicorn --workers 4", lambda p, q: B.uvicorn_own(a.venv, p, n), False),
            ("gunicorn -k asgi -w 4",
             lambda p, q: [str(v / "gunicorn"), "-w", str(n), "-k", "asgi", "-b", f"{B.HOST}:{p}",
                           "--chdir", str(B.FIXTURES), "--log-level", "warning", "asgi_app:app"], False),
        ]
        if a.smoke:
            contenders = [contenders[1]]
        rows = []
        for name, mk, is_drover in contenders:
            port, admin = B.free_port(), B.free_port()
            with Running(mk(port, admin), env, port, admin if is_drover else None,
                         settle=0.3 if "uvicorn" not in name and "gunicorn" not in name else 2.0):
                row = {"contender": name}
                for c in conns:
                    row[f"burst_{c}"] = burst_shares(port, c, trials, n)
                row["grown_16"] = grown_shares(port, 16, trials, n)
                rows.append(row)
                print(f"balance: {name}: " + ", ".join(
                    f"{k}={r['share']}" for k, r in row.items() if k != "contender"), file=sys.stderr)
        report["balance"] = rows

    if "parity" in parts:
        pairs = [
            ("uvicorn", lambda p, q: drover(p, q, 2, "--", *uvicorn_w),
             lambda p, q: drover(p, q, 2, "--balance", "reuseport", "--", *uvicorn_w),
             lambda p: B.uvicorn_own(a.venv, p, 2), env),
            ("gunicorn -k asgi", lambda p, q: drover(p, q, 2, "--", *asgi_gunicorn_w),
             lambda p, q: drover(p, q, 2, "--balance", "reuseport", "--", *asgi_gunicorn_w),
             lambda p: [str(v / "gunicorn"), "-w", "2", "-k", "asgi", "-b", f"{B.HOST}:{p}",
                        "--chdir", str(B.FIXTURES), "--log-level", "warning", "asgi_app:app"], env),
            ("hypercorn", lambda p, q: drover(p, q, 2, "--", *hypercorn_w),
             lambda p, q: drover(p, q, 2, "--balance", "reuseport", "--", *hypercorn_w),
             lambda p: [str(v / "hypercorn"), "--workers", "2", "--bind", f"{B.HOST}:{p}",
                        "--log-level", "warning", "asgi_app:app"], hypercorn_env(env)),
        ]
        if a.smoke:
            pairs = pairs[:1]
        secs = 1 if a.smoke else 3
        rows = []
        for name, shared, reuse, own, e in pairs:
            row = {"server": name}
            for kind, headers in (("keep_alive", ()), ("new_connection", ("Connection: close",))):
                runs = {"shared": [], "reuseport": [], "own": []}
                ports = {k: (B.free_port(), B.free_port()) for k in runs}
                procs = {}
                try:
                    procs["shared"] = Running(shared(*ports["shared"]), e, ports["shared"][0], ports["shared"][1], 2.0)
                    procs["reuseport"] = Running(reuse(*ports["reuseport"]), e, ports["reuseport"][0],
                                                 ports["reuseport"][1], 2.0)
                    procs["own"] = Running(own(ports["own"][0]), e, ports["own"][0], None, 2.0)
                    for k in runs:  # warm-up
                        B.wrk(ports[k][0], 1, 50, 1, headers=headers)
                    for _ in range(trials):
                        for k in runs:
                            runs[k].append(B.wrk(ports[k][0], 1, 50, secs, headers=headers)["rps"])
                finally:
                    for pr in procs.values():
                        pr.__exit__()
                res = {k: B.rnd(B.median(x), 0) for k, x in runs.items()}
                for k in ("shared", "reuseport"):
                    ratios = [d / o for d, o in zip(runs[k], runs["own"])]
                    res[f"ratio_{k}"] = B.rnd(B.median(ratios), 3)
                    ci = B.median_ci95(ratios)
                    res[f"ci95_{k}"] = [B.rnd(ci[0], 3), B.rnd(ci[1], 3)] if ci else None
                row[kind] = res
                print(f"parity: {name} {kind}: {res}", file=sys.stderr)
            rows.append(row)
        report["parity"] = rows

    if "scaling" in parts:
        secs = 1 if a.smoke else 3
        rps = {"1": [], "2 shared": [], "2 reuseport": []}
        ports = {k: (B.free_port(), B.free_port()) for k in rps}
        procs = {}
        try:
            procs["1"] = Running(drover(*ports["1"], 1), env, ports["1"][0], ports["1"][1])
            procs["2 shared"] = Running(drover(*ports["2 shared"], 2), env, ports["2 shared"][0],
                                        ports["2 shared"][1])
            procs["2 reuseport"] = Running(drover(*ports["2 reuseport"], 2, "--balance", "reuseport"), env,
                                           ports["2 reuseport"][0], ports["2 reuseport"][1])
            for _ in range(trials):
                for k in rps:
                    rps[k].append(B.wrk(ports[k][0], 1, 8, secs, path="/work?ms=2")["rps"])
        finally:
            for pr in procs.values():
                pr.__exit__()
        res = {k: B.rnd(B.median(x), 0) for k, x in rps.items()}
        for k in ("2 shared", "2 reuseport"):
            ratios = [x / y for x, y in zip(rps[k], rps["1"])]
            res[f"scaling {k}"] = B.rnd(B.median(ratios), 2)
        report["scaling"] = res
        print(f"scaling: {res}", file=sys.stderr)

    print(markdown(report))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def markdown(r: dict) -> str:
    out = []
    if "balance" in r:
        keys = [k for k in r["balance"][0] if k != "contender"]
        out.append("| contender | " + " | ".join(
            k.replace("burst_", "burst c=").replace("grown_", "grown c=") for k in keys) + " |")
        out.append("|---|" + "---|" * len(keys))
        for row in r["balance"]:
            out.append(f"| {row['contender']} | " + " | ".join(str(row[k]["share"]) for k in keys) + " |")
        out.append("")
    if "parity" in r:
        out.append("| server | traffic | drover shared | drover reuseport | own --workers 2 | "
                   "ratio shared (95 % CI) | ratio reuseport (95 % CI) |")
        out.append("|---|---|---|---|---|---|---|")
        for row in r["parity"]:
            for kind in ("keep_alive", "new_connection"):
                x = row[kind]
                out.append(f"| {row['server']} | {kind.replace('_', '-')} | {x['shared']} | {x['reuseport']} | "
                           f"{x['own']} | {x['ratio_shared']} {x['ci95_shared']} | "
                           f"{x['ratio_reuseport']} {x['ci95_reuseport']} |")
        out.append("")
    if "scaling" in r:
        s = r["scaling"]
        out.append(f"CPU-bound (/work?ms=2, 8 keep-alive connections): --workers 1 {s['1']} req/s, "
                   f"--workers 2 shared {s['2 shared']} ({s['scaling 2 shared']}x), "
                   f"reuseport {s['2 reuseport']} ({s['scaling 2 reuseport']}x)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
