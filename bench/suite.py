#!/usr/bin/env python3
"""drover's benchmark suite, one invocation: runs every part, one after the
other, on the same machine and build, checks the goals of issue 7, writes
bench/results/latest.json (and latest.md) and prints a markdown report.

Parts (each a script in bench/, run as a subprocess with its own --json):
  throughput  data path under wrk vs a baseline       bench/throughput.py
  balance     keep-alive connections per worker      bench/balance.py
  ready       time to first 200, drover vs own modes  bench/ready.py
  lifecycle   time to ready and stop latency          bench/lifecycle.py
  drain       lossless drain under load               bench/drain.py
  footprint   RSS idle / after 100k requests; binary  bench/footprint.py
  scale       64 workers; 10k keep-alive conns drain  bench/scale.py
  scrape      supervisor CPU per /metrics, 64 workers bench/scrape.py

Exit status: non-zero when a part could not run (crashed, timed out, wrote
no results, or reported an error of its own) - not when a goal is missed.

usage: bench/suite.py [--smoke] [--parts throughput,ready,...] [--out DIR]
Normally started by bench/run, which builds and installs what is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as B  # noqa: E402

PARTS = ["throughput", "balance", "ready", "lifecycle", "drain", "footprint", "scale", "scrape"]

GOAL_RATIO = 0.97
GOAL_READY_MS = 20.0
GOAL_STOP_MS = 20.0
GOAL_RSS_MB = 5.0
#: Growth of a process between the first and the second batch of requests
#: that still counts as "no growth" (allocator noise).
STEADY_GROWTH_KB = 64


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_times() -> list[int]:
    """The aggregate `cpu` line of /proc/stat (user nice system idle iowait
    irq softirq steal ...), in ticks."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return []


def cpu_usage(before: list[int], after: list[int]) -> dict:
    """Share of all CPU time that was busy and that the hypervisor stole."""
    if not before or not after:
        return {}
    d = [b - a for a, b in zip(before, after)]
    total = sum(d[:8]) or 1
    return {"busy": round(1 - (d[3] + d[4]) / total, 3), "steal": round(d[7] / total, 3) if len(d) > 7 else None}


def machine(a) -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def out(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"
        except (OSError, subprocess.SubprocessError, IndexError):
            return "?"

    mem_total = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) // 1024} MB"
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "memory": mem_total,
        "python": platform.python_version(),
        "wrk": out(["wrk", "-v"]),
        "drover": out([str(a.drover), "--version"]),
        "rustc": out(["rustc", "--version"]),
        "venv": out([str(a.venv / "bin" / "python"), "-c",
                     "import gunicorn, uvicorn; print('gunicorn', gunicorn.__version__, "
                     "'uvicorn', uvicorn.__version__)"]),
        "somaxconn": Path("/proc/sys/net/core/somaxconn").read_text().strip(),
        "nofile_hard": out(["bash", "-c", "ulimit -Hn"]),
        "loadavg_start": loadavg(),
    }


def part_argv(name: str, a, json_path: Path) -> list[str]:
    py = sys.executable
    bench = B.REPO / "bench"
    smoke = ["--smoke"] if a.smoke else []
    common = ["--drover", str(a.drover)]
    return {
        "throughput": [py, bench / "throughput.py", *smoke, *common, "--direct", str(a.direct),
                       "--venv", str(a.venv), "--json", json_path],
        "balance": [py, bench / "balance.py", *smoke, *common, "--venv", str(a.venv),
                    "--json", json_path],
        "ready": [py, bench / "ready.py", *smoke, *common, "--direct", str(a.direct),
                  "--venv", str(a.venv), "--json", json_path],
        "lifecycle": [py, bench / "lifecycle.py", *common, "--reps", "4" if a.smoke else "20",
                      "--workers", "1,2,8", "--json", json_path],
        "drain": [py, bench / "drain.py", *smoke, *common, "--venv", str(a.venv),
                  "--json", json_path],
        "footprint": [py, bench / "footprint.py", *smoke, *common, "--direct", str(a.direct),
                      "--venv", str(a.venv), "--json", json_path],
        "scale": [py, bench / "scale.py", *smoke, *common, "--direct", str(a.direct), "--json", json_path],
        "scrape": [py, bench / "scrape.py", *common, "--workers", "64",
                   "--scrapes", "20" if a.smoke else "300", "--json", json_path],
    }[name]


#: Per-part bound (seconds), full and smoke.
TIMEOUTS = {"throughput": (660, 60), "balance": (90, 30), "ready": (300, 40), "lifecycle": (120, 30),
            "drain": (240, 60), "footprint": (120, 40), "scale": (150, 40), "scrape": (60, 20)}


def run_part(name: str, a) -> dict:
    json_path = a.out / f"{name}.json"
    if json_path.exists():
        json_path.unlink()
    argv = [str(x) for x in part_argv(name, a, json_path)]
    bound = TIMEOUTS[name][1 if a.smoke else 0]
    rec = {"argv": argv, "loadavg_before": loadavg()}
    cpu0 = cpu_times()
    print(f"== {name}: {' '.join(Path(argv[1]).parts[-2:])} {' '.join(argv[2:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, cwd=B.REPO, capture_output=True, text=True, timeout=bound,
                           env=B.child_env(a.venv))
        rec["rc"] = r.returncode
        rec["stdout"] = r.stdout
        rec["stderr_tail"] = r.stderr[-4000:]
    except subprocess.TimeoutExpired as e:
        rec["rc"] = None
        rec["error"] = f"timed out after {bound} s"
        rec["stdout"] = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    rec["seconds"] = round(time.monotonic() - t0, 1)
    rec["loadavg_after"] = loadavg()
    rec["cpu"] = cpu_usage(cpu0, cpu_times())
    if json_path.exists():
        try:
            rec["result"] = json.loads(json_path.read_text())
        except ValueError as e:
            rec["error"] = f"unreadable JSON: {e}"
    elif "error" not in rec:
        rec["error"] = "wrote no JSON"
    # drain.py exits 1 when drover's own app is not lossless: that is a goal
    # result, not a failure to run; its JSON says whether anything errored.
    if name == "drain" and "result" in rec:
        errs = [f"{x['key']}: {x['error']}" for x in rec["result"].get("results", []) if x.get("error")]
        if errs:
            rec["error"] = "; ".join(errs)
    elif rec.get("rc") not in (0, None) and "error" not in rec:
        rec["error"] = f"exit code {rec['rc']}"
    rec["ok"] = "error" not in rec
    status = "ok" if rec["ok"] else f"FAILED ({rec['error']})"
    print(f"   {status} in {rec['seconds']} s (load {rec['loadavg_before']} -> {rec['loadavg_after']})",
          file=sys.stderr, flush=True)
    if not rec["ok"]:
        print(rec.get("stderr_tail", "")[-2000:], file=sys.stderr)
    return rec


# --------------------------------------------------------------------------
# goals and the report


def mark(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**missed**")


def goals(parts: dict) -> list[dict]:
    g: list[dict] = []

    def add(num, text, measured, ok):
        g.append({"item": num, "goal": text, "measured": measured, "met": ok})

    tp = parts.get("throughput", {}).get("result", {}).get("groups", {})

    def per_round(r, key):
        base = {x["round"]: x for x in r["baseline"]["runs"]}
        return [x[key] / base[x["round"]][key] for x in r["drover"]["runs"]
                if x["round"] in base and base[x["round"]].get(key) and x.get(key) is not None]

    def ci(xs):
        c = B.median_ci95(xs)
        return "–" if c is None else f"{c[0]:.3f}–{c[1]:.3f}"

    # The built-in app: drover ≥ 0.97 × direct, on the median of the
    # per-round ratios (and, sharper on a noisy machine, CPU per request).
    for key, label in (("builtin1", "drover --workers 1 ≥ 0.97 × direct"),
                       ("builtin2", "drover --workers 2 ≥ 0.97 × direct --threads 2")):
        if key not in tp:
            continue
        r = tp[key]
        rr, cr = per_round(r, "rps"), per_round(r, "cpu_us_per_req")
        add(1, f"{label}: req/s", f"{B.median(rr):.3f} (95% CI {ci(rr)}); p99 ratio {r['p99_ratio']:.2f}",
            B.median(rr) >= GOAL_RATIO)
        add(1, f"{label}: server CPU per request ≤ {1 / GOAL_RATIO:.3f} × (the same goal, robust to neighbours)",
            f"{B.median(cr):.3f} (95% CI {ci(cr)})", B.median(cr) <= 1 / GOAL_RATIO)
    # External commands: "drover adds nothing measurable": met unless the
    # 95% confidence interval of the ratio lies wholly on drover's worse side.
    for key, label in (("gunicorn", "drover + gunicorn adds nothing measurable vs gunicorn -w 2"),
                       ("uvicorn_close", "drover + uvicorn adds nothing measurable vs uvicorn --workers 2 (new connection per request)"),
                       ("uvicorn", "drover + uvicorn adds nothing measurable vs uvicorn --workers 2, keep-alive (latency-bound: see notes)")):
        if key not in tp:
            continue
        r = tp[key]
        rr, cr = per_round(r, "rps"), per_round(r, "cpu_us_per_req")
        rci, cci = B.median_ci95(rr), B.median_ci95(cr)
        top = 100 * r["drover"].get("top_cpu_s_median", 0) / max(1, round(parts["throughput"]["result"]["settings"]["duration_s"]))
        add(1, f"{label}: req/s ratio, 95% CI not wholly below 1",
            f"{B.median(rr):.3f} (95% CI {ci(rr)}); p99 ratio {r['p99_ratio']:.2f}",
            None if rci is None else rci[1] >= 1.0)
        add(1, f"{label}: server CPU per request ratio, 95% CI not wholly above 1",
            f"{B.median(cr):.3f} (95% CI {ci(cr)}); drover supervisor itself {top:.1f}% of a core",
            None if cci is None else cci[0] <= 1.0)
    lc = parts.get("lifecycle", {}).get("result")
    if lc:
        for row in lc:
            if row["workers"] == 2:
                ms = row["time_to_ready"]["median_ms"]
                add(2, "built-in, 2 workers: time to first 200 < 20 ms", f"{ms} ms (median)", ms < GOAL_READY_MS)
        worst = max(max(r["stop_http"]["median_ms"], r["stop_sigterm"]["median_ms"]) for r in lc)
        detail = ", ".join(f"{r['workers']}w {r['stop_http']['median_ms']}/{r['stop_sigterm']['median_ms']}" for r in lc)
        add(3, "stop → tree gone < 20 ms (1, 2, 8 workers; POST/SIGTERM medians)", f"{detail} ms", worst < GOAL_STOP_MS)
    dr = parts.get("drain", {}).get("result")
    if dr:
        for r in dr.get("results", []):
            if r["key"] in ("a", "b", "c"):
                ok = (not r.get("error") and r.get("failures", 1) == 0 and r.get("long_ok") == 4
                      and not r.get("timed_out") and not r.get("leftover_pids"))
                add(4, f"drain: 0 failed — {r['name']}",
                    f"{r.get('failures', '?')} failed of {r.get('requests', '?')}, long {r.get('long_ok', '?')}/4, "
                    f"exit {r.get('exit_code')}", ok)
    fp = parts.get("footprint", {}).get("result")
    if fp:
        d = fp["drover"]
        phs = d["phases"]
        last = phs[-1]
        sup = [d[p]["supervisor"]["VmRSS"] for p in phs]
        wk = [w["VmRSS"] for p in phs for w in d[p]["workers"]]
        add(5, "supervisor VmRSS < 5 MiB", f"{max(sup) / 1024:.2f} MiB (max over the run; "
            f"{d['idle']['supervisor']['VmRSS'] / 1024:.2f} MiB idle)", max(sup) / 1024 < GOAL_RSS_MB)
        add(5, "built-in worker VmRSS < 5 MiB", f"{max(wk) / 1024:.2f} MiB (max over the run; "
            f"{max(w['VmRSS'] for w in d['idle']['workers']) / 1024:.2f} MiB idle)", max(wk) / 1024 < GOAL_RSS_MB)
        n1 = d["after_1"]["requests"]
        names = ["supervisor"] + [f"worker {i}" for i in range(len(d["idle"]["workers"]))]

        def at(ph):
            return [d[ph]["supervisor"]] + d[ph]["workers"]
        grow1 = {n: b["VmRSS"] - i["VmRSS"] for n, i, b in zip(names, at("idle"), at("after_1"))}
        add(5, f"no growth: idle → after {n1} requests (VmRSS)",
            ", ".join(f"{n} {v:+d} kB" for n, v in grow1.items()), max(grow1.values()) <= 0)
        sk = d.get("soak") or []
        if sk:
            mid = min(sk, key=lambda x: abs(x["requests"] - sk[-1]["requests"] / 2))

            def anon(m):
                return [m["supervisor"]["RssAnon"]] + [w["RssAnon"] for w in m["workers"]]
            grow = [b - a_ for a_, b in zip(anon(mid["mem"]), anon(sk[-1]["mem"]))]
            add(5, f"no leak: heap (RssAnon) flat over the second half of a {sk[-1]['requests']}-request soak "
                f"(≤ {STEADY_GROWTH_KB} kB)",
                f"{mid['requests']} → {sk[-1]['requests']} requests: "
                + ", ".join(f"{n} {v:+d} kB" for n, v in zip(names, grow)), max(grow) <= STEADY_GROWTH_KB)
        elif last != "after_1":
            g_anon = {n: b["RssAnon"] - i["RssAnon"] for n, i, b in zip(names, at("after_1"), at(last))}
            add(5, f"no leak: heap (RssAnon) after {n1} → after {d[last]['requests']} requests "
                f"(≤ {STEADY_GROWTH_KB} kB; short of a soak: allocator warm-up shows here too)",
                ", ".join(f"{n} {v:+d} kB" for n, v in g_anon.items()), max(g_anon.values()) <= STEADY_GROWTH_KB)
    sc = parts.get("scale", {}).get("result")
    if sc and "keepalive_drain" in sc:
        k = sc["keepalive_drain"]
        c = k["closes"]
        add(6, f"{k['conns']} keep-alive connections across a drain: every one EOF, no RST, exit 0",
            f"EOF {c['eof']}, RST {c['reset']}, open {c['open']}, exit {k['exit_code']} "
            f"({k.get('stop_to_tree_gone_ms')} ms)", k["clean"])
    if sc and "many_workers" in sc:
        w = sc["many_workers"]
        add(6, f"{w['workers']} workers start, scrape and stop cleanly",
            f"ready {w['all_ready_ms']} ms, stop {w['stop_ms']} ms, exit {w['exit_codes']}",
            w["exit_codes"] == [0])
    return g


def fmt_ms(x):
    return "–" if x is None else f"{x:g} ms"


def report(doc: dict) -> str:
    m, parts = doc["machine"], doc["parts"]
    L = []
    L.append(f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']}, Linux {m['kernel']}, "
             f"{m['date']}; load average at start {m['loadavg_start']}; mode: "
             f"{'smoke' if doc['smoke'] else 'full'}; suite wall time {doc['wall_s']} s.")
    L.append(f"Versions: {m['drover']}; {m['rustc']}; {m['wrk']}; Python {m['python']}; {m['venv']}.")
    L.append("")

    tp = parts.get("throughput", {}).get("result")
    if tp:
        s = tp["settings"]
        L.append(f"### 1. Data path (wrk on loopback; {s['reps']} alternating rounds of {s['duration_s']:g} s per side; medians)")
        L.append("")
        L.append("| comparison | wrk | contender | req/s | ratio (range) | p99 | server CPU µs/req | ratio (range) "
                 "| server busy, cores | top process, % of a core | busiest loop's share of server CPU |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for key, r in tp["groups"].items():
            for i, side in enumerate(r["sides"]):
                x = r[side]
                if side == "baseline":
                    rr = cr = "1 (baseline)"
                else:
                    rr = f"**{x['rps_ratio']:.3f}** ({x['rps_ratio_range'][0]:.2f}–{x['rps_ratio_range'][1]:.2f})"
                    cr = f"**{x['cpu_ratio']:.3f}** ({x['cpu_ratio_range'][0]:.2f}–{x['cpu_ratio_range'][1]:.2f})"
                head = (f"{r['title']}{' (server pinned to CPU 0, wrk to CPU 1)' if r['pinned'] else ''} | `{r['wrk']}`"
                        if i == 0 else " | ")
                L.append(f"| {head} | `{x['name']}` | {x['rps_median']:.0f} | {rr} | {x['p99_ms_median']:g} ms | "
                         f"{x['cpu_us_per_req_median']:g} | {cr} | {x['server_busy_median']:g} | "
                         f"{100 * x.get('top_cpu_s_median', 0) / max(1, round(s['duration_s'])):.1f} | "
                         f"{x.get('busiest_loop_share_median', '–')} |")
        L.append("")

    rd = parts.get("ready", {}).get("result")
    lc = parts.get("lifecycle", {}).get("result")
    if rd or lc:
        L.append("### 2. Time to ready (spawn → first 200 on `/`; median / p90)")
        L.append("")
        ws = rd["workers"] if rd else [1, 2, 8]
        L.append("| contender | " + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in ws) + " |")
        L.append("|---|" + "---|" * len(ws))
        if lc:
            by = {r["workers"]: r["time_to_ready"] for r in lc}
            L.append("| drover built-in (bench/lifecycle.py) | " + " | ".join(
                f"{by[w]['median_ms']:g} / {by[w]['p90_ms']:g} ms" if w in by else "–" for w in ws) + " |")
        if rd:
            names = []
            for r in rd["rows"]:
                if r["contender"] not in names:
                    names.append(r["contender"])
            label = {"direct": "direct built-in, no drover (1 loop)", "drover": "drover built-in (bench/ready.py)",
                     "drover+gunicorn": "drover + gunicorn -w 1 per worker", "drover+uvicorn": "drover + uvicorn --fd 3 per worker",
                     "gunicorn": "gunicorn -w N (own master)", "uvicorn": "uvicorn --workers N (own supervisor)"}
            for n in names:
                cells = []
                for w in ws:
                    row = next((r for r in rd["rows"] if r["contender"] == n and (r["workers"] == w or n == "direct")), None)
                    cells.append("–" if row is None else f"{row['median_ms']:g} / {row['p90_ms']:g} ms")
                    if n == "direct":
                        cells = [cells[0]] + ["(same)"] * (len(ws) - 1)
                        break
                L.append(f"| {label.get(n, n)} | " + " | ".join(cells) + " |")
        L.append("")
    if lc:
        L.append("### 3. Stop latency (idle, `--drain-delay 0`; stop → whole tree gone; median / p90)")
        L.append("")
        L.append("| workers | POST /admin/stop | SIGTERM |")
        L.append("|---|---|---|")
        for r in lc:
            L.append(f"| {r['workers']} | {r['stop_http']['median_ms']:g} / {r['stop_http']['p90_ms']:g} ms | "
                     f"{r['stop_sigterm']['median_ms']:g} / {r['stop_sigterm']['p90_ms']:g} ms |")
        L.append("")

    dr = parts.get("drain", {}).get("result")
    if dr:
        st = dr["settings"]
        L.append(f"### 4. Lossless drain (bench/drain.py: {st['clients']} clients × `GET /sleep?ms={st['short_ms']}` "
                 f"on new connections, {st['long_count']} × {st['long_ms']} ms requests; SIGTERM at {st['stop_at_s']:g} s)")
        L.append("")
        L.append("| contender | requests | ok | failed | refused after stop | long ok | stop → exit | exit | lossless |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in dr["results"]:
            if "counts" not in r:
                L.append(f"| {r['name']} | – | – | – | – | – | – | – | error: {r.get('error')} |")
                continue
            lossless = (not r.get("error") and r["failures"] == 0 and r["long_ok"] == st["long_count"]
                        and not r.get("timed_out") and not r.get("leftover_pids"))
            fails = ", ".join(f"{k} {r['counts'][k]}" for k in dr["classes"]["failure"] if r["counts"].get(k))
            L.append(f"| {r['name']} | {r['requests']} | {r['counts']['ok']} | {r['failures']}"
                     f"{' (' + fails + ')' if fails else ''} | {r['counts']['refused_after_stop']} | "
                     f"{r['long_ok']}/{st['long_count']} | {r.get('stop_to_exit_s', '–')} s | {r.get('exit_code', '–')} | "
                     f"{'yes' if lossless else '**no**'} |")
        L.append("")

    fp = parts.get("footprint", {}).get("result")
    if fp:
        d = fp["drover"]
        phs = d["phases"]
        L.append(f"### 5. Footprint (VmRSS, MiB; RssAnon in brackets; `wrk -t1 -c16` keep-alive; built-in app, 2 workers)")
        L.append("")
        L.append("| process | " + " | ".join("idle" if p == "idle" else f"after {d[p]['requests']} requests"
                                            for p in phs) + " |")
        L.append("|---|" + "---|" * len(phs))

        def cell(x):
            return f"{x['VmRSS'] / 1024:.2f} ({x.get('RssAnon', 0) / 1024:.2f})"
        L.append("| drover supervisor | " + " | ".join(cell(d[p]["supervisor"]) for p in phs) + " |")
        for i in range(len(d["idle"]["workers"])):
            L.append(f"| drover worker {i} | " + " | ".join(cell(d[p]["workers"][i]) for p in phs) + " |")
        dd = fp["direct"]
        L.append("| direct, no drover (after " + " / ".join(str(dd[p]["requests"]) for p in dd["phases"][1:])
                 + " requests) | " + " | ".join(cell(dd[p]) for p in dd["phases"]) + " |")
        blank = " |" * (len(phs) - 1)
        for key in ("gunicorn", "uvicorn", "drover_gunicorn"):
            r = fp[key]
            L.append(f"| `{r['name']}`: supervisor | {cell(r['supervisor'])} |{blank}")
            ws_ = r["workers"] + r.get("grandchildren", [])
            L.append(f"| `{r['name']}`: each child{' and grandchild' if r.get('grandchildren') else ''} | "
                     f"{', '.join(cell(w) for w in ws_)} |{blank}")
        for key, label in (("drover", "drover (supervisor, worker 0, worker 1)"), ("direct", "direct")):
            sk = fp[key].get("soak") or []
            if sk:
                def anon(m):
                    return ([m["supervisor"]["RssAnon"]] + [w["RssAnon"] for w in m["workers"]]
                            if "supervisor" in m else [m["RssAnon"]])
                pick = sk if len(sk) <= 6 else [sk[int(i * (len(sk) - 1) / 5)] for i in range(6)]
                L.append("")
                L.append(f"Soak, {label}, RssAnon in kB at N requests: " + "; ".join(
                    f"{x['requests'] / 1e6:.2f} M: {'/'.join(str(v) for v in anon(x['mem']))}" for x in pick) + ".")
        b = fp["binary"]
        L.append("")
        build = "debug" if "/debug/" in b["path"] else "release"
        L.append(f"drover binary ({build}, {'stripped' if b['stripped'] else 'NOT stripped'}): "
                 f"{b['bytes'] / 1e6:.2f} MB; `examples/direct`: {fp['binary_direct']['bytes'] / 1e6:.2f} MB. "
                 f"Executable pages resident (RssFile of the binary itself): supervisor "
                 f"{d['idle']['supervisor'].get('RssExe', 0) / 1024:.2f} MiB, worker "
                 f"{d['idle']['workers'][0].get('RssExe', 0) / 1024:.2f} MiB idle.")
        L.append("")

    sc = parts.get("scale", {}).get("result")
    scr = parts.get("scrape", {}).get("result")
    if sc or scr:
        L.append("### 6. Scale")
        L.append("")
        if sc and "many_workers" in sc:
            w = sc["many_workers"]
            L.append(f"| drover --workers {w['workers']} ({w['reps']} starts; medians) | |")
            L.append("|---|---|")
            L.append(f"| spawn → first 200 | {w['first_200_ms']:g} ms |")
            L.append(f"| spawn → /readyz 200 (all {w['workers']} up) | {w['all_ready_ms']:g} ms |")
            L.append(f"| one `/metrics` scrape | {w['scrape_ms']:g} ms, {w['series']} series, {w['scrape_bytes']} bytes |")
            if scr:
                L.append(f"| supervisor CPU per scrape (bench/scrape.py, {scr['scrapes']} scrapes) | "
                         f"{scr['supervisor_cpu_ms_per_scrape']:g} ms CPU, {scr['wall_ms_per_scrape']:g} ms wall |")
            L.append(f"| POST /admin/stop → tree gone | {w['stop_ms']:g} ms (exit {', '.join(map(str, w['exit_codes']))}) |")
            L.append("")
        if sc and "keepalive_drain" in sc:
            k = sc["keepalive_drain"]
            c = k["closes"]
            r = k["responses"]
            L.append(f"| {k['conns']} idle keep-alive connections, drover --workers 2, drain | |")
            L.append("|---|---|")
            L.append(f"| RLIMIT_NOFILE | soft {k['rlimit_nofile']['soft_before']} → {k['rlimit_nofile']['soft_now']} "
                     f"(hard {k['rlimit_nofile']['hard']}) |")
            L.append(f"| open / one request each | {k['open_s']} s / {k['request_s']} s; per worker "
                     f"{', '.join(f'{w}: {n}' for w, n in r['per_worker'].items())}; bad responses "
                     f"{sum(r['bad'].values())} |")
            L.append(f"| held idle {k['held_s']:g} s | {k['closed_while_idle']} closed |")
            hold = k["rss_kb_holding"]
            L.append(f"| VmRSS while holding | supervisor {hold['supervisor'] / 1024:.1f} MiB, workers "
                     f"{', '.join(f'{x / 1024:.1f}' for x in hold['workers'])} MiB |")
            dh = k.get("direct_holding")
            if dh and "rss_kb_idle" in k:
                per = (sum(hold["workers"]) - sum(k["rss_kb_idle"]["workers"])) / k["conns"]
                L.append(f"| memory per held connection | drover workers {per:.1f} KiB; "
                         f"`direct --threads 2` (hyper alone) {(dh['holding_kb'] - dh['idle_kb']) / dh['conns']:.1f} KiB |")
            L.append(f"| after POST /admin/stop | EOF {c['eof']}, RST {c['reset']}, unexpected data {c['data']}, "
                     f"still open {c['open']} |")
            L.append(f"| first / median / last close | {fmt_ms(c.get('first_close_ms'))} / "
                     f"{fmt_ms(c.get('median_close_ms'))} / {fmt_ms(c.get('last_close_ms'))} |")
            L.append(f"| drover exit | code {k['exit_code']}, tree gone {fmt_ms(k.get('stop_to_tree_gone_ms'))} after the stop |")
            L.append("")

    bal = parts.get("balance", {}).get("result")
    if bal:
        L.append(f"### 7. Balance: keep-alive connections per worker (wrk -t1, 1 s; {bal['trials']} trials; no goal, a finding)")
        L.append("")
        L.append("| contender | wrk connections | split per worker (each trial) | busiest worker's share (median; ideal 0.5) |")
        L.append("|---|---|---|---|")
        for r in bal["rows"]:
            L.append(f"| `{r['contender']}` | {r['conns']} | {', '.join('/'.join(map(str, x)) for x in r['splits'])} | "
                     f"{r['busiest_share_median']:g} |")
        L.append("")

    L.append("### Goals")
    L.append("")
    L.append("| item | goal | measured | |")
    L.append("|---|---|---|---|")
    for g in doc["goals"]:
        L.append(f"| {g['item']} | {g['goal']} | {g['measured']} | {mark(g['met'])} |")
    L.append("")
    L.append("### Parts")
    L.append("")
    L.append("| part | ran | seconds | load average before → after | machine CPU busy / stolen by the hypervisor |")
    L.append("|---|---|---|---|---|")
    for name, p in parts.items():
        c = p.get("cpu") or {}
        cu = f"{c['busy'] * 100:.0f}% / {c['steal'] * 100:.1f}%" if c.get("steal") is not None else "–"
        L.append(f"| {name} | {'ok' if p['ok'] else '**FAILED**: ' + p['error']} | {p['seconds']} | "
                 f"{p['loadavg_before']} → {p['loadavg_after']} | {cu} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="fast form for CI (< ~60 s)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--drover", type=Path, default=B.DEFAULT_DROVER)
    ap.add_argument("--direct", type=Path, default=B.DEFAULT_DIRECT)
    ap.add_argument("--venv", type=Path, default=B.DEFAULT_VENV)
    ap.add_argument("--out", type=Path, default=B.RESULTS, help="results directory (bench/results)")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="run nothing: rebuild the goals and the report from a saved latest.json")
    a = ap.parse_args(argv)
    if a.report:
        doc = json.loads(a.report.read_text())
        doc["goals"] = goals(doc["parts"])
        doc.pop("report_error", None)
        md = report(doc)
        a.report.write_text(json.dumps(doc, indent=2) + "\n")
        a.report.with_suffix(".md").write_text(md)
        print(md)
        return 0
    a.drover, a.direct, a.venv = a.drover.resolve(), a.direct.resolve(), a.venv.absolute()
    a.out = a.out.resolve() / ("smoke" if a.smoke else "full")
    a.out.mkdir(parents=True, exist_ok=True)
    for f, what in ((a.drover, "drover"), (a.direct, "examples/direct")):
        if not f.is_file():
            print(f"{what} not built: {f} (bench/run builds it)", file=sys.stderr)
            return 2
    started = time.monotonic()
    doc = {"benchmark": "drover suite", "smoke": a.smoke, "machine": machine(a), "parts": {}}
    for name in a.parts.split(","):
        if name not in PARTS:
            print(f"unknown part {name!r}; parts: {','.join(PARTS)}", file=sys.stderr)
            return 2
        doc["parts"][name] = run_part(name, a)
    doc["wall_s"] = round(time.monotonic() - started, 1)
    doc["machine"]["loadavg_end"] = loadavg()
    report_error = None
    try:
        doc["goals"] = goals(doc["parts"])
        md = report(doc)
    except Exception as e:  # noqa: BLE001 - a part's JSON changed shape: say so, keep the data
        import traceback
        report_error = f"{type(e).__name__}: {e}"
        doc.setdefault("goals", [])
        doc["report_error"] = traceback.format_exc()
        md = f"bench: the report could not be built ({report_error}); raw results in latest.json\n"
    # latest.json is always the last run (its "smoke" field says which form);
    # latest-full.json / latest-smoke.json keep the last of each form.
    blob = json.dumps(doc, indent=2) + "\n"
    latest = a.out.parent / "latest.json"
    for path in (latest, a.out.parent / f"latest-{'smoke' if a.smoke else 'full'}.json"):
        path.write_text(blob)
        path.with_suffix(".md").write_text(md)
    print(md)
    print(f"results: {latest} and {latest.with_suffix('.md')}", file=sys.stderr)
    failed = [n for n, p in doc["parts"].items() if not p["ok"]]
    if report_error:
        print(doc["report_error"], file=sys.stderr)
        failed.append("report")
    if failed:
        print(f"bench: parts that failed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
