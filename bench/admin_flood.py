#!/usr/bin/env python3
"""The admin port under abuse, and during a large reload (issue 13).

Flood: an attacker holds --conns connections on the admin port (a third
idle, a third slowloris - one more header line every 300 ms, never the
end -, a third keep-alive that sent a request and never read the answer)
and opens 200 more a second, dropping its oldest. Meanwhile a legitimate
client probes /healthz, /readyz and /metrics on fresh connections every
100 ms for --seconds; then POST /admin/stop. Reported: probes, failures
(no 200 within 1 s), latency p50/p99/max, the stop's latency.

Reload: a contexts file of about --reload-kib KiB (a valid sequence) is
swapped in, again and again, while /healthz is probed every 10 ms;
reported: /healthz latency max and p99 during the reloads.

    python3 bench/admin_flood.py --drover target/release/drover [--conns 2000] [--seconds 10]

Python 3.11 stdlib only. Exits 1 when a probe failed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402


def probe(port: int, method: str, path: str, limit: float = 1.0) -> tuple[int | None, float]:
    t0 = time.perf_counter()
    try:
        with socket.create_connection((bl.HOST, port), timeout=limit) as s:
            s.settimeout(limit)
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      f"Content-Length: 0\r\n\r\n".encode())
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        code = int(buf.split(b" ", 2)[1]) if buf.startswith(b"HTTP/1.1 ") else None
    except (OSError, ValueError, IndexError):
        code = None
    return code, time.perf_counter() - t0


def attacker_socket(port: int) -> socket.socket | None:
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((bl.HOST, port))
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        return None
    return s


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def flood(drover: Path, conns: int, seconds: float) -> dict:
    port, admin = bl.free_port(), bl.free_port()
    p = bl.spawn(bl.drover_argv(drover, port, admin, 1), bl.child_env())
    try:
        bl.wait_200(admin, "/readyz", p=p)
        third = conns // 3
        idle = [s for s in (attacker_socket(admin) for _ in range(third)) if s]
        slow = [s for s in (attacker_socket(admin) for _ in range(third)) if s]
        keep = [s for s in (attacker_socket(admin) for _ in range(conns - 2 * third)) if s]
        time.sleep(0.3)
        for s in slow:
            try:
                s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass
        for s in keep:
            try:
                s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            except OSError:
                pass
        stop = threading.Event()

        def trickle():
            while not stop.is_set():
                for s in slow:
                    try:
                        s.send(b"X-a: b\r\n")
                    except OSError:
                        pass
                stop.wait(0.3)

        def churn():
            held = []
            while not stop.is_set():
                s = attacker_socket(admin)
                if s:
                    held.append(s)
                if len(held) > 200:
                    held.pop(0).close()
                stop.wait(0.005)
            for s in held:
                s.close()

        threads = [threading.Thread(target=trickle), threading.Thread(target=churn)]
        for t in threads:
            t.start()
        lat, failures, fds = [], [], 0
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            for path in ("/healthz", "/readyz", "/metrics"):
                code, took = probe(admin, "GET", path)
                lat.append(took)
                if code != 200 or took >= 1.0:
                    failures.append(f"{path}: {code} after {took:.3f}s")
            try:
                fds = max(fds, len(os.listdir(f"/proc/{p.pid}/fd")))
            except OSError:
                pass
            time.sleep(0.1)
        code, stop_took = probe(admin, "POST", "/admin/stop")
        stop.set()
        for t in threads:
            t.join()
        for s in idle + slow + keep:
            s.close()
        if code != 202 or stop_took >= 1.0:
            failures.append(f"stop: {code} after {stop_took:.3f}s")
        p.wait(timeout=30)
        return {
            "attacker_connections": len(idle) + len(slow) + len(keep),
            "churn_per_second": 200,
            "seconds": seconds,
            "probes": len(lat),
            "failures": failures,
            "probe_ms_p50": round(pct(lat, 0.5) * 1000, 2),
            "probe_ms_p99": round(pct(lat, 0.99) * 1000, 2),
            "probe_ms_max": round(max(lat) * 1000, 2),
            "stop_ms": round(stop_took * 1000, 2),
            "stop_status": code,
            "drover_fds_max": fds,
        }
    finally:
        bl.kill_tree(p)


def reload_latency(drover: Path, kib: int, seconds: float) -> dict:
    port, admin = bl.free_port(), bl.free_port()
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "ctx.yaml"
        workers = 10
        f.write_text("[" + ", ".join(f"{{v: {i}}}" for i in range(workers)) + "]\n")
        p = bl.spawn(bl.drover_argv(drover, port, admin, workers, "--worker-contexts-file",
                                    str(f), "--on-contexts-change", "ignore"), bl.child_env())
        try:
            bl.wait_200(admin, "/readyz", p=p)
            # Ten workers, each context about kib/10 KiB of small mappings
            # (valid: under the 127 KiB per worker, the whole under 1 MiB).
            per = max(1, kib * 1024 // workers // 24)
            docs = []
            for gen in range(2):
                items = ", ".join(f"{{k{i}: [1, 2.5, x{gen}]}}" for i in range(per))
                docs.append(f"- [{items}]\n" * workers)
            size = len(docs[0])
            lat, failed, n = [], 0, 0
            until = time.perf_counter() + seconds
            next_swap = 0.0
            while time.perf_counter() < until:
                if time.perf_counter() >= next_swap:
                    tmp = Path(d) / "tmp.yaml"
                    tmp.write_text(docs[n % 2])
                    os.rename(tmp, f)
                    n += 1
                    next_swap = time.perf_counter() + 0.5
                code, took = probe(admin, "GET", "/healthz")
                lat.append(took)
                failed += code != 200
                time.sleep(0.01)
            time.sleep(1.0)
            try:
                text = bl.get(admin, "/metrics", timeout=60)[1].decode()
            except OSError as e:
                text = f"scrape failed: {e}"
            reloads = [l for l in text.splitlines() if l.startswith("drover_contexts_reloads_total")]
            return {
                "document_bytes": size,
                "swaps": n,
                "reloads": reloads,
                "healthz_ms_p99": round(pct(lat, 0.99) * 1000, 2),
                "healthz_ms_max": round(max(lat) * 1000, 2),
                "probes": len(lat),
                "healthz_failed_1s": failed,
            }
        finally:
            bl.kill_tree(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drover", type=Path, default=bl.DEFAULT_DROVER)
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reload-kib", type=int, default=1000)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * args.conns + 1024
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    out = {
        "flood": flood(args.drover, args.conns, args.seconds),
        "reload": reload_latency(args.drover, args.reload_kib, min(args.seconds, 5.0)),
    }
    print(json.dumps(out, indent=2))
    return 1 if out["flood"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
