#!/usr/bin/env python3
"""Balance: how keep-alive connections spread over the worker processes that
share one listening socket.

Every worker process of drover (and of gunicorn / uvicorn) waits on the same
socket; the kernel wakes them, and whichever runs first may accept every
connection queued. With few long-lived connections (a proxy's or an
ingress's pool), that can leave one worker with all of them. For each
contender and each wrk connection count, --trials times: run wrk (-t1,
keep-alive, 1 s), read the established connections of the listening port per
process from `ss -tnp` half-way through, and report the busiest worker's share
(ideal: 1/N).

Contenders: drover --workers 2 (built-in app), drover --workers 2 --
uvicorn --fd 3, uvicorn --workers 2 (smoke: the first only).

usage: bench/balance.py [--smoke] [--conns 4,16,64] [--trials 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402


def measure(port: int, conns: int, trials: int, workers: int) -> dict:
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
        s += [0] * (workers - len(s))
        splits.append(s)
        shares.append(s[0] / max(1, sum(s)))
    return {"conns": conns, "splits": splits, "busiest_share_median": B.rnd(B.median(shares), 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drover", type=Path, default=B.DEFAULT_DROVER)
    ap.add_argument("--venv", type=Path, default=B.DEFAULT_VENV)
    ap.add_argument("--conns", default=None, help="default 4,16,64; smoke 16")
    ap.add_argument("--trials", type=int, default=None, help="default 3; smoke 1")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    conns = [int(x) for x in (a.conns or ("16" if a.smoke else "4,16,64")).split(",")]
    trials = a.trials or (1 if a.smoke else 3)
    a.drover, a.venv = a.drover.resolve(), a.venv.absolute()
    env = B.child_env(a.venv)
    contenders = [
        ("drover --workers 2", lambda p, q: B.drover_argv(a.drover, p, q, 2), True),
        ("drover --workers 2 -- uvicorn --fd 3",
         lambda p, q: B.drover_argv(a.drover, p, q, 2, "--", *B.uvicorn_worker_cmd(a.venv)), True),
        ("uvicorn --workers 2", lambda p, q: B.uvicorn_own(a.venv, p, 2), False),
    ]
    if a.smoke:
        contenders = contenders[:1]
    rows = []
    for name, mk, is_drover in contenders:
        port, admin = B.free_port(), B.free_port()
        p = B.spawn(mk(port, admin), env)
        try:
            B.wait_200(port, "/", timeout=30, p=p, poll=0.005)
            if is_drover:
                B.wait_200(admin, "/readyz", timeout=30, p=p, poll=0.005)
            time.sleep(0.3 if "uvicorn" not in name else 1.5)
            for c in conns:
                r = measure(port, c, trials, 2)
                r["contender"] = name
                rows.append(r)
        finally:
            B.stop_tree(p)
    print("| contender | wrk connections | per-worker split (each trial) | busiest worker's share (median; ideal 0.5) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['contender']} | {r['conns']} | {', '.join('/'.join(map(str, s)) for s in r['splits'])} "
              f"| {r['busiest_share_median']} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"trials": trials, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
