#!/usr/bin/env python3
"""Time to ready: from spawn to the first 200 on `/`, for 1, 2 and 8 workers.

Contenders, alternated within each round (the order rotates every round):
  direct            examples/direct, the built-in app with no drover (1 loop;
                    the same for every worker count)
  drover            drover --workers N, built-in app
  drover+gunicorn   drover --workers N -- gunicorn -w 1 (LISTEN_FDS)
  drover+uvicorn    drover --workers N -- uvicorn --fd 3
  gunicorn          gunicorn -w N, bound by gunicorn
  uvicorn           uvicorn --workers N, bound by uvicorn
The probe connects every 0.5 ms (like bench/lifecycle.py); a connection the
kernel queued before any worker accepts simply waits for its answer, so the
first 200 is timed when the first worker serves it. After each start the whole
tree is stopped (SIGTERM) and waited for before the next one.

usage: bench/ready.py [--smoke] [--workers 1,2,8] [--reps N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402

ORDER = ["direct", "drover", "drover+gunicorn", "drover+uvicorn", "gunicorn", "uvicorn"]


def argv_for(name, a, n, port, admin):
    d, venv = a.drover, a.venv
    return {
        "direct": lambda: B.direct_argv(a.direct, port, 1),
        "drover": lambda: B.drover_argv(d, port, admin, n),
        "drover+gunicorn": lambda: B.drover_argv(d, port, admin, n, "--", *B.gunicorn_worker_cmd(venv)),
        "drover+uvicorn": lambda: B.drover_argv(d, port, admin, n, "--", *B.uvicorn_worker_cmd(venv)),
        "gunicorn": lambda: B.gunicorn_own(venv, port, n),
        "uvicorn": lambda: B.uvicorn_own(venv, port, n),
    }[name]()


def once(name, a, n, env):
    port, admin = B.free_port(), B.free_port()
    argv = argv_for(name, a, n, port, admin)
    t0 = time.perf_counter()
    p = B.spawn(argv, env)
    try:
        deadline = t0 + 60
        while True:
            try:
                # A long read timeout: a queued connection waits for a worker.
                if B.get(port, "/", timeout=30)[0] == 200:
                    break
            except OSError:
                pass
            if p.poll() is not None:
                raise RuntimeError(f"{name} (x{n}) exited with {p.returncode} before answering")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{name} (x{n}) gave no 200 within 60 s")
            time.sleep(0.0005)
        return time.perf_counter() - t0
    finally:
        # Let Python workers finish booting before the stop so that the stop
        # does not race their start (both gunicorn and uvicorn may then hang).
        if name != "direct" and name != "drover":
            time.sleep(0.2 + 0.1 * n)
        if B.stop_tree(p, timeout=20) is None:
            print(f"[ready] {name} x{n} did not stop on SIGTERM; killed", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drover", type=Path, default=B.DEFAULT_DROVER)
    ap.add_argument("--direct", type=Path, default=B.DEFAULT_DIRECT)
    ap.add_argument("--venv", type=Path, default=B.DEFAULT_VENV)
    ap.add_argument("--workers", default=None, help="default 1,2,8; smoke 2")
    ap.add_argument("--reps", type=int, default=None, help="default 5; smoke 2")
    ap.add_argument("--only", default=",".join(ORDER))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.reps = a.reps or (2 if a.smoke else 5)
    ws = [int(x) for x in (a.workers or ("2" if a.smoke else "1,2,8")).split(",")]
    a.drover, a.direct, a.venv = a.drover.resolve(), a.direct.resolve(), a.venv.absolute()
    env = B.child_env(a.venv)
    names = [x for x in ORDER if x in a.only.split(",")]
    samples: dict[tuple[str, int], list[float]] = {}
    for rep in range(a.reps):
        for n in ws:
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                if name == "direct" and n != ws[0]:
                    continue  # N-independent: once per round
                samples.setdefault((name, n), []).append(once(name, a, n, env))
        print(f"[ready] round {rep + 1}/{a.reps} done", file=sys.stderr, flush=True)
    rows = []
    for name in names:
        for n in ws:
            xs = samples.get((name, n))
            if not xs:
                continue
            rows.append({"contender": name, "workers": 1 if name == "direct" else n,
                         "median_ms": B.rnd(B.median(xs) * 1000),
                         "p90_ms": B.rnd(B.p90(xs) * 1000),
                         "samples_ms": [B.rnd(x * 1000) for x in xs]})
    print("| contender | workers | time to first 200 (median / p90) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['contender']} | {r['workers']} | {r['median_ms']} ms / {r['p90_ms']} ms |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"reps": a.reps, "workers": ws, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
