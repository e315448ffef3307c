#!/usr/bin/env python3
"""Scale: 64 workers on a small machine, and 10 000 idle keep-alive
connections held across a drain.

Part 1, drover --workers 64 (built-in app), --reps times:
  time from spawn to the first 200 on `/`, and to /readyz 200 (all 64 up);
  one GET /metrics: wall time, series (non-comment lines) and bytes;
  POST /admin/stop -> the whole process tree gone (idle, --drain-delay 0).

Part 2, drover --workers 2 --backlog 4096 --drain-delay 0, --conns
connections (10 000; smoke 100):
  raise RLIMIT_NOFILE to the hard limit (this process; drover and its
  workers inherit it), open the connections in batches, send one
  `GET /` on each and read the full response (keep-alive: no
  `Connection: close`), hold them idle for a second (none may close), then
  POST /admin/stop and watch every socket: the server must close each one
  cleanly (EOF, FIN) - not reset it (RST) and not leave it open - and drover
  must exit 0. Reports the per-worker spread of the connections, the workers'
  RSS while holding them, and the times from the stop to the first and last
  close and to drover's exit. Then examples/direct --threads 2 holds as many
  connections, for hyper's own memory per connection.

Non-blocking sockets and selectors only (stdlib).

usage: bench/scale.py [--smoke] [--workers 64] [--reps 3] [--conns 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import resource
import selectors
import socket
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402


# --------------------------------------------------------------------------
# part 1: many workers


def many_workers(a, env) -> dict:
    runs = []
    for _ in range(a.reps):
        port, admin = B.free_port(), B.free_port()
        t0 = time.perf_counter()
        p = B.spawn(B.drover_argv(a.drover, port, admin, a.workers), env)
        try:
            t_first = B.wait_200(port, "/", timeout=60, p=p, poll=0.0005)
            t_all = B.wait_200(admin, "/readyz", timeout=60, p=p, poll=0.001)
            running = len(B.descendants(p.pid))
            time.sleep(0.2)
            s0 = time.perf_counter()
            status, body = B.get(admin, "/metrics", timeout=10)
            scrape = time.perf_counter() - s0
            if status != 200:
                raise RuntimeError(f"/metrics answered {status}")
            text = body.decode()
            series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
            m = re.search(r"^drover_workers_running (\d+)", text, re.M)
            tree = [p.pid] + B.descendants(p.pid)
            s0 = time.perf_counter()
            if B.get(admin, "/admin/stop", "POST")[0] != 202:
                raise RuntimeError("POST /admin/stop did not answer 202")
            p.wait(timeout=30)
            while any(B.alive(x) for x in tree[1:]):
                time.sleep(0.0002)
            stop = time.perf_counter() - s0
            runs.append({
                "first_200_ms": B.rnd((t_first - t0) * 1000), "all_ready_ms": B.rnd((t_all - t0) * 1000),
                "processes": running, "workers_running_metric": int(m.group(1)) if m else None,
                "scrape_ms": B.rnd(scrape * 1000), "series": series, "scrape_bytes": len(body),
                "stop_ms": B.rnd(stop * 1000), "exit_code": p.returncode,
            })
        finally:
            if p.poll() is None:
                B.kill_tree(p)
    med = lambda k: B.rnd(B.median([r[k] for r in runs]))  # noqa: E731
    return {"workers": a.workers, "reps": a.reps, "runs": runs,
            "first_200_ms": med("first_200_ms"), "all_ready_ms": med("all_ready_ms"),
            "scrape_ms": med("scrape_ms"), "series": runs[-1]["series"],
            "scrape_bytes": runs[-1]["scrape_bytes"], "stop_ms": med("stop_ms"),
            "exit_codes": sorted({r["exit_code"] for r in runs})}


# --------------------------------------------------------------------------
# part 2: many idle keep-alive connections across a drain

REQ = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def raise_nofile(need: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return {"soft_before": soft, "hard": hard if hard != resource.RLIM_INFINITY else "unlimited",
            "soft_now": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def open_all(port: int, n: int, batch: int = 500, timeout: float = 30) -> list[socket.socket]:
    """n connected non-blocking sockets, opened batch by batch (so the accept
    queue never overflows into SYN retransmissions)."""
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout
    try:
        while len(socks) < n:
            pending = set()
            for _ in range(min(batch, n - len(socks) - len(pending))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex((B.HOST, port))
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    raise OSError(err, f"connect: {errno.errorcode.get(err, err)}")
                sel.register(s, selectors.EVENT_WRITE)
                pending.add(s)
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(pending)} connects pending after {timeout} s")
                for key, _ in sel.select(timeout=1):
                    s = key.fileobj
                    sel.unregister(s)
                    pending.discard(s)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        s.close()
                        raise OSError(err, f"connect: {errno.errorcode.get(err, err)}")
                    socks.append(s)
    except BaseException:
        for s in socks:
            s.close()
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        raise
    finally:
        sel.close()
    return socks


def _response_done(buf: bytes) -> tuple[bool, dict]:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False, {}
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    n = int(headers.get("content-length", "0"))
    if len(body) < n:
        return False, {}
    return True, {"status": int(lines[0].split()[1]), "headers": headers, "body": body[:n],
                  "extra": len(body) - n}


def request_all(socks: list[socket.socket], timeout: float = 60) -> dict:
    """Sends one request on every socket and reads every response."""
    sel = selectors.DefaultSelector()
    bufs: dict[socket.socket, bytearray] = {}
    for s in socks:
        s.send(REQ)  # tiny: fits in an empty send buffer
        bufs[s] = bytearray()
        sel.register(s, selectors.EVENT_READ)
    per_worker: dict[int, int] = {}
    bad = {"status": 0, "conn_close": 0, "closed": 0, "reset": 0, "extra": 0}
    deadline = time.monotonic() + timeout
    left = len(socks)
    while left:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{left} responses missing after {timeout} s")
        for key, _ in sel.select(timeout=1):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                bad["reset"] += 1
                sel.unregister(s)
                left -= 1
                continue
            except BlockingIOError:
                continue
            if not chunk:
                bad["closed"] += 1
                sel.unregister(s)
                left -= 1
                continue
            bufs[s] += chunk
            done, r = _response_done(bytes(bufs[s]))
            if done:
                sel.unregister(s)
                left -= 1
                if r["status"] != 200:
                    bad["status"] += 1
                if r["headers"].get("connection", "").lower() == "close":
                    bad["conn_close"] += 1
                if r["extra"]:
                    bad["extra"] += 1
                try:
                    w = json.loads(r["body"])["worker"]
                    per_worker[w] = per_worker.get(w, 0) + 1
                except (ValueError, KeyError):
                    pass
    sel.close()
    return {"per_worker": dict(sorted(per_worker.items())), "bad": bad}


def watch_closes(socks: list[socket.socket], t_ref: float, timeout: float) -> dict:
    """Waits for the server to close every socket; classifies each close."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    out = {"eof": 0, "reset": 0, "data": 0, "open": 0}
    times = []
    deadline = time.monotonic() + timeout
    left = len(socks)
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                out["reset"] += 1
                times.append(time.perf_counter() - t_ref)
                sel.unregister(s)
                left -= 1
                continue
            except BlockingIOError:
                continue
            if chunk:
                out["data"] += 1  # unexpected bytes; keep watching for the close
                continue
            out["eof"] += 1
            times.append(time.perf_counter() - t_ref)
            sel.unregister(s)
            left -= 1
    out["open"] = left
    sel.close()
    times.sort()
    if times:
        out["first_close_ms"] = B.rnd(times[0] * 1000)
        out["median_close_ms"] = B.rnd(B.median(times) * 1000)
        out["last_close_ms"] = B.rnd(times[-1] * 1000)
    return out


def quiet(socks: list[socket.socket], seconds: float) -> int:
    """How many sockets became readable (closed or data) while idle."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    ready = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=max(0.0, end - time.monotonic())):
            ready.add(key.fileobj)
            sel.unregister(key.fileobj)
    sel.close()
    return len(ready)


def keepalive_drain(a, env) -> dict:
    limits = raise_nofile(a.conns + 256)
    conns = a.conns
    usable = limits["soft_now"] - 256
    res: dict = {"rlimit_nofile": limits, "conns_asked": conns}
    if usable < conns:
        conns = usable
        res["note"] = f"RLIMIT_NOFILE hard limit {limits['hard']}: only {conns} connections"
    res["conns"] = conns
    port, admin = B.free_port(), B.free_port()
    p = B.spawn(B.drover_argv(a.drover, port, admin, 2, "--backlog", "4096"), env)
    socks: list[socket.socket] = []
    try:
        B.wait_200(admin, "/readyz", timeout=30, p=p, poll=0.005)
        workers = B.descendants(p.pid)
        rss_idle = {"supervisor": B.vmrss_kb(p.pid), "workers": [B.vmrss_kb(w) for w in workers]}
        t = time.perf_counter()
        socks = open_all(port, conns)
        res["open_s"] = B.rnd(time.perf_counter() - t, 3)
        t = time.perf_counter()
        res["responses"] = request_all(socks)
        res["request_s"] = B.rnd(time.perf_counter() - t, 3)
        res["closed_while_idle"] = quiet(socks, a.hold)
        res["held_s"] = a.hold
        res["rss_kb_holding"] = {"supervisor": B.vmrss_kb(p.pid),
                                 "workers": [B.vmrss_kb(w) for w in workers]}
        res["rss_kb_idle"] = rss_idle
        tree = [p.pid] + B.descendants(p.pid)
        t_stop = time.perf_counter()
        status = B.get(admin, "/admin/stop", "POST", timeout=10)[0]
        res["stop_status"] = status
        res["closes"] = watch_closes(socks, t_stop, timeout=a.close_timeout)
        try:
            p.wait(timeout=max(1.0, a.close_timeout - (time.perf_counter() - t_stop)))
        except Exception:  # noqa: BLE001
            pass
        res["exit_code"] = p.poll()
        if res["exit_code"] is not None:
            while any(B.alive(x) for x in tree[1:]):
                time.sleep(0.0005)
            res["stop_to_tree_gone_ms"] = B.rnd((time.perf_counter() - t_stop) * 1000)
        bad = res["responses"]["bad"]
        c = res["closes"]
        res["clean"] = (status == 202 and not any(bad.values()) and res["closed_while_idle"] == 0
                        and c["eof"] == conns and c["reset"] == 0 and c["open"] == 0
                        and res["exit_code"] == 0)
        return res
    finally:
        for s in socks:
            s.close()
        if p.poll() is None:
            B.kill_tree(p)


def direct_hold(a, env, conns: int) -> dict:
    """Memory of examples/direct --threads 2 holding the same connections:
    what hyper alone costs per connection."""
    port = B.free_port()
    p = B.spawn(B.direct_argv(a.direct, port, 2) + ["--backlog", "4096"], env)
    socks: list[socket.socket] = []
    try:
        B.wait_200(port, "/", timeout=10, p=p, poll=0.005)
        idle = B.vmrss_kb(p.pid)
        socks = open_all(port, conns)
        r = request_all(socks)
        time.sleep(0.3)
        return {"conns": conns, "idle_kb": idle, "holding_kb": B.vmrss_kb(p.pid), "bad": r["bad"]}
    finally:
        for s in socks:
            s.close()
        B.stop_tree(p)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drover", type=Path, default=B.DEFAULT_DROVER)
    ap.add_argument("--direct", type=Path, default=B.DEFAULT_DIRECT)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--reps", type=int, default=None, help="64-worker starts (default 3; smoke 1)")
    ap.add_argument("--conns", type=int, default=None, help="keep-alive connections (default 10000; smoke 100)")
    ap.add_argument("--hold", type=float, default=None, help="idle hold before the stop, s (default 1; smoke 0.2)")
    ap.add_argument("--close-timeout", type=float, default=40.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--parts", default="workers,conns")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.reps = a.reps or (1 if a.smoke else 3)
    a.conns = a.conns or (100 if a.smoke else 10_000)
    a.hold = a.hold if a.hold is not None else (0.2 if a.smoke else 1.0)
    a.drover, a.direct = a.drover.resolve(), a.direct.resolve()
    env = B.child_env()
    parts = a.parts.split(",")
    res = {}
    if "workers" in parts:
        print(f"[scale] {a.workers} workers x{a.reps} ...", file=sys.stderr, flush=True)
        res["many_workers"] = w = many_workers(a, env)
        print(f"| {w['workers']} workers | first 200 {w['first_200_ms']} ms | all ready {w['all_ready_ms']} ms "
              f"| /metrics {w['scrape_ms']} ms, {w['series']} series, {w['scrape_bytes']} bytes "
              f"| stop {w['stop_ms']} ms | exit {w['exit_codes']} |")
    if "conns" in parts:
        print(f"[scale] {a.conns} keep-alive connections across a drain ...", file=sys.stderr, flush=True)
        res["keepalive_drain"] = k = keepalive_drain(a, env)
        c = k["closes"]
        print(f"| {k['conns']} keep-alive conns | per worker {k['responses']['per_worker']} "
              f"| bad responses {k['responses']['bad']} | closed while idle {k['closed_while_idle']} "
              f"| EOF {c['eof']}, RST {c['reset']}, still open {c['open']} "
              f"| last close {c.get('last_close_ms')} ms | exit {k['exit_code']} after "
              f"{k.get('stop_to_tree_gone_ms')} ms | clean: {k['clean']} |")
        k["direct_holding"] = dh = direct_hold(a, env, k["conns"])
        held = sum(k["rss_kb_holding"]["workers"]) - sum(k["rss_kb_idle"]["workers"])
        print(f"| memory per held connection | drover workers {held / k['conns']:.1f} kB | "
              f"direct --threads 2 {(dh['holding_kb'] - dh['idle_kb']) / dh['conns']:.1f} kB |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
