#!/usr/bin/env python3
"""The RBD section of benches/compare.sh: docs/benchmarks-rbd.md.

    python3 benches/rbd_report.py target/bench/compare-DATE --md docs/benchmarks-rbd.md

Reads the points benches/rbd.sh wrote (rbd.* and pcrbd.* JSON files), takes
the median over rounds, and compares pcache in front of the image with
qemu-storage-daemon's own rbd driver on the same image, against issue 13's
targets.
"""

import argparse
import datetime
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_report import fmt, load, machine, med  # noqa: E402
from sustained_report import full_seconds, last30, status_of  # noqa: E402

POINTS = {
    "rbd_wf1": "4k randwrite+FLUSH QD1",
    "rbd_w1": "4k randwrite QD1",
    "rbd_w32": "4k randwrite QD32 (within the cache)",
    "rbd_w32wt": "4k randwrite QD32, pcache --mode writethrough",
    "rbd_w32wa": "4k randwrite QD32, pcache --mode writearound",
    "rbd_r32miss": "4k randread QD32 whole image, each block once",
    "rbd_hotf64": "4k randwrite QD32, hot set 25 % of the cache, FLUSH every 64",
}
PEERS = {
    "pcrbd": "pcache --backing rbd",
    "pcrbdn": "pcache --backing rbd --writeback-order newest",
    "rbd": "QSD rbd, cache.direct=on",
}


def git_rev():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def sustained_bound(a, runs, pc, qsd, newest):
    """What bounds the sustained hot-set point, from the run's own numbers."""
    sts = status_of(a.res, "rbd_hotf64")
    if not sts or not pc:
        return []
    wb = statistics.median(s["stats"]["writeback_bytes"] for s in sts)
    paced = statistics.median(s["stats"]["writes_paced"] for s in sts)
    secs = float(a.sus_runtime)
    return [
        "What bounds the sustained hot set (from this run's numbers): once the cache's log is full, a "
        "write waits for writeback to free space, and writeback moves at the image's speed. In the "
        f"{a.sus_runtime} s pcache wrote back {wb / 1e6:,.0f} MB ({wb / secs / 1e6:.1f} MB/s, about "
        f"{wb / secs / 4096:,.0f} 4 KiB writes a second, where QSD's own writes ran at {fmt(qsd)} a second) and "
        f"paced {paced:,.0f} writes behind it. Writeback keeps the image alone consistent at the end of every "
        "batch (every flush epoch up to some E, `docs/reliability.md` guarantee 4), so it writes every version "
        "a batch holds and coalesces overwrites only within a batch; with a hot set a quarter of the cache that "
        "saves little: the steady rate is about the image's own random-write rate (in this run "
        + (f"{pc / qsd:.2f}x QSD's" if pc and qsd else "-")
        + "; the first seconds, while the cache takes the writes, run at cache speed). "
        "`--writeback-order newest` skips the versions that newer durable keys anywhere in the dirty log "
        "replace, so each pass writes a few percent of what it frees"
        + (f" ({fmt(newest)} IOPS here)" if newest else "")
        + "; it gives up the consistency of the image alone until the cache is clean "
        "(`docs/operations.md`, \"Writeback order\"). What is left bounds it: every pass still writes the "
        "blocks the hot set changed since the last, at the rate pcache's one core leaves librbd.",
        "",
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("res")
    ap.add_argument("--md", required=True)
    ap.add_argument("--elapsed", default="?")
    ap.add_argument("--start-state", default="")
    ap.add_argument("--cache-size", default="2G")
    ap.add_argument("--rbd-size", default="4G")
    ap.add_argument("--ws", default="256M")
    ap.add_argument("--rounds", default="3")
    ap.add_argument("--runtime", default="10")
    ap.add_argument("--sus-runtime", default="60")
    ap.add_argument("--pcache-rev", default="")
    a = ap.parse_args()
    runs = load(a.res)

    def m(peer, point, *path):
        return med(runs.get((peer, point), []), *path)

    def sustained(peer):
        rs = runs.get((peer, "rbd_hotf64"), [])
        vals = [last30(r) for r in rs]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    def ratio(a_, b_):
        return a_ / b_ if a_ and b_ else None

    targets = [
        ("4 KiB random write + FLUSH after each, QD1", "writes/s",
         m("pcrbd", "rbd_wf1", "iops"), m("rbd", "rbd_wf1", "iops"), ">= 20x", lambda r: r >= 20),
        ("4 KiB random write QD32 within the cache", "IOPS",
         m("pcrbd", "rbd_w32", "iops"), m("rbd", "rbd_w32", "iops"), ">= 20x", lambda r: r >= 20),
        (f"sustained hot set 25 % of the cache, FLUSH every 64, {a.sus_runtime} s (last 30 s)", "IOPS",
         sustained("pcrbd"), sustained("rbd"), ">= 10x", lambda r: r >= 10),
        ("the same, `--writeback-order newest`", "IOPS",
         sustained("pcrbdn"), sustained("rbd"), ">= 10x", lambda r: r >= 10),
        ("4 KiB random read QD32, all misses", "IOPS",
         m("pcrbd", "rbd_r32miss", "iops"), m("rbd", "rbd_r32miss", "iops"), ">= 0.9x", lambda r: r >= 0.9),
        ("4 KiB random write QD32, write-through", "IOPS",
         m("pcrbd", "rbd_w32wt", "iops"), m("rbd", "rbd_w32", "iops"), ">= 0.9x", lambda r: r >= 0.9),
        ("4 KiB random write QD32, write-around", "IOPS",
         m("pcrbd", "rbd_w32wa", "iops"), m("rbd", "rbd_w32", "iops"), ">= 0.9x", lambda r: r >= 0.9),
    ]
    mc = machine()
    rev = a.pcache_rev or git_rev()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmarks: pcache in front of Ceph RBD",
        "",
        f"Measured {now} by `benches/compare.sh` (its RBD section, `benches/rbd.sh`; "
        f"{a.rounds} interleaved rounds, {a.runtime} s per time-based point, {a.elapsed} s in all). "
        "Every number is the median over the rounds. Re-measure only this section with "
        "`SECTIONS=rbd benches/compare.sh` (it rewrites this file).",
        "",
        "## Setup",
        "",
        f"- {mc['nproc']} CPUs: {mc['cpu']}; {mc['mem']} RAM; kernel {mc['kernel']}; {a.start_state}",
        f"- a throwaway single-node Ceph cluster (`scripts/ceph-cluster.sh`: one mon, one BlueStore OSD "
        f"on a sparse file on the same disk, pool size 1) on this machine, its daemons unpinned; one image of "
        f"{a.rbd_size}, written through once before the runs so misses read real objects",
        "- the peer: qemu-storage-daemon `--blockdev driver=rbd,...,cache.direct=on` (librbd with its cache "
        "off), exported over vhost-user-blk; pcache " + rev + ": `pcache serve --backing rbd:rbd/IMAGE:conf=...` "
        f"with a fresh {a.cache_size} cache on tmpfs for each write point; both on the same image; server on "
        "core 0, client (`examples/vub_bench.rs`) on core 1",
        f"- random writes and hits span {a.ws}; misses read every block of the image once (`--random-map`)",
        "- Ceph's own persistent write-back cache for librbd (PWL, `rbd_persistent_cache_mode`) is not built "
        "into Debian's librbd (no `libceph_librbd_pwl_cache.so`), so it cannot run side by side here; its "
        "published goal is 99.99 % of writes under 1 ms, the latency row below holds pcache to that.",
        "",
        "## Targets of issue 13",
        "",
        "| target | unit | pcache | QSD rbd | pcache/QSD | target | result |",
        "|---|---|---|---|---|---|---|",
    ]
    met = 0
    for name, unit, p, q, tgt, ok in targets:
        r = ratio(p, q)
        res = "-" if r is None else ("**pass**" if ok(r) else "**miss**")
        met += res == "**pass**"
        out.append(f"| {name} | {unit} | {fmt(p)} | {fmt(q)} | {fmt(r, 2)}x | {tgt} | {res} |")
    p999 = m("pcrbd", "rbd_w1", "lat_us", "p99_9")
    res = "-" if p999 is None else ("**pass**" if p999 <= 1000 else "**miss**")
    met += res == "**pass**"
    out.append(f"| 4 KiB random write QD1, p99.9 latency | µs | {fmt(p999)} | {fmt(m('rbd', 'rbd_w1', 'lat_us', 'p99_9'))} "
               f"| - | <= 1,000 µs | {res} |")
    out += ["", f"{met} of {len(targets) + 1} targets met.", ""]
    out += sustained_bound(a, runs, sustained("pcrbd"), sustained("rbd"), sustained("pcrbdn"))
    out += ["## All medians", "",
            "| peer | workload | rounds | IOPS | MB/s | mean µs | p50 µs | p99 µs | p99.9 µs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for point, desc in POINTS.items():
        for peer, pname in PEERS.items():
            if peer == "pcrbdn" and point != "rbd_hotf64":
                continue
            rs = runs.get((peer, point), [])
            if not rs:
                continue
            out.append(f"| {pname} | {desc} | {len(rs)} | {fmt(med(rs, 'iops'))} | {fmt(med(rs, 'mb_s'))} "
                       f"| {fmt(med(rs, 'lat_us', 'mean'))} | {fmt(med(rs, 'lat_us', 'p50'))} "
                       f"| {fmt(med(rs, 'lat_us', 'p99'))} | {fmt(med(rs, 'lat_us', 'p99_9'))} |")
    out += ["", "Sustained hot set, IOPS per 10 s of the run (median over rounds):", ""]
    for peer, pname in PEERS.items():
        rs = runs.get((peer, "rbd_hotf64"), [])
        if not rs:
            continue
        secs = full_seconds(rs[0])
        tens = [statistics.mean(secs[i:i + 10]) for i in range(0, len(secs), 10) if secs[i:i + 10]]
        out.append(f"- {pname}: " + ", ".join(fmt(t, 0) for t in tens))
    out += ["", "Commands: `" + os.path.join(a.res, "commands.txt") + "` of the run lists each server and "
            "client command line.", ""]
    open(a.md, "w").write("\n".join(out))
    print(f"rbd_report: wrote {a.md}", file=sys.stderr)


if __name__ == "__main__":
    main()
