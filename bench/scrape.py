#!/usr/bin/env python3
"""Cost of one /metrics scrape in supervisor CPU, with many workers.

Starts drover with --workers N (built-in app), sends some traffic so every
metric family is populated, then scrapes /metrics --scrapes times on one
keep-alive connection and reads the supervisor's CPU time (utime+stime from
/proc) before and after. Reports CPU per scrape and wall time per scrape.

usage: bench/scrape.py [--drover target/release/drover] [--workers 32] [--scrapes 2000]
"""
import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--drover", default="target/release/drover")
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--scrapes", type=int, default=2000)
    ap.add_argument("--json")
    a = ap.parse_args()
    port, admin = free_port(), free_port()
    p = subprocess.Popen([a.drover, "--host", "127.0.0.1", "--port", str(port), "--admin-host", "127.0.0.1",
                          "--admin-port", str(admin), "--workers", str(a.workers), "--log-level", "warn"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", admin, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("not ready")
            time.sleep(0.01)
        for path in ["/", "/nope"] * 200:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            c.getresponse().read()
            c.close()
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
        c.request("GET", "/metrics")
        body = c.getresponse().read()
        before = cpu_seconds(p.pid)
        t0 = time.perf_counter()
        for _ in range(a.scrapes):
            c.request("GET", "/metrics")
            body = c.getresponse().read()
        wall = (time.perf_counter() - t0) / a.scrapes
        cpu = (cpu_seconds(p.pid) - before) / a.scrapes
        series = sum(1 for l in body.decode().splitlines() if l and not l.startswith("#"))
        res = {"workers": a.workers, "scrapes": a.scrapes, "series": series, "bytes": len(body),
               "supervisor_cpu_ms_per_scrape": round(cpu * 1000, 3), "wall_ms_per_scrape": round(wall * 1000, 3)}
        print(f"| {a.workers} workers | {series} series, {len(body)} bytes | {res['supervisor_cpu_ms_per_scrape']} ms CPU/scrape | {res['wall_ms_per_scrape']} ms wall/scrape |")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(res, fh, indent=2)
    finally:
        p.terminate()
        p.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
