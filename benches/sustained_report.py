#!/usr/bin/env python3
"""The sustained section of benches/compare.sh: tables and an IOPS-over-time plot.

    python3 benches/sustained_report.py target/bench/compare-DATE --md docs/benchmarks.md \
        --svg docs/benchmarks-sustained.svg

Reads the points compare.sh's `sustained` and `overrun` functions wrote
(PEER.POINT.rROUND.json, each with `iops_per_s`), appends a section to the
markdown file compare_report.py wrote, and draws IOPS per second of pcache
and qemu-storage-daemon (raw O_DIRECT) on one chart per write point.
"""

import argparse
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_report import load  # noqa: E402

WRITES = {
    "hot": "hot set 25 % of the cache, no FLUSH",
    "hotf64": "hot set 25 % of the cache, FLUSH every 64",
    "ws2xf64": "working set 2x the cache, FLUSH every 64",
}
READS = {"hotread": "hot", "hotf64read": "hotf64", "ws2xf64read": "ws2xf64"}
PEERS = {"pcache": "pcache", "direct": "QSD raw O_DIRECT", "null": "QSD null-co"}
COLORS = {"pcache": "#d62728", "direct": "#1f77b4"}


def full_seconds(r):
    """IOPS of each whole second (the last entry is a partial second)."""
    ps = r.get("iops_per_s") or []
    return ps[:-1] if len(ps) > 1 else ps


def last30(r):
    ps = full_seconds(r)
    return statistics.mean(ps[-30:]) if len(ps) >= 30 else None


def first_second(r):
    ps = full_seconds(r)
    return ps[0] if ps else None


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd=0):
    if v is None:
        return "-"
    return f"{v:,.{nd}f}"


def status_of(res, point):
    out = []
    for f in sorted(glob.glob(os.path.join(res, f"pcache.{point}.r*.status.json"))):
        try:
            out.append(json.load(open(f)))
        except (OSError, ValueError):
            pass
    return out


def series(rs):
    """Per-second median over rounds."""
    cols = [full_seconds(r) for r in rs]
    n = max((len(c) for c in cols), default=0)
    return [statistics.median([c[i] for c in cols if i < len(c)]) for i in range(n)]


def svg(runs, path):
    panel_w, panel_h, pad_l, pad_b, pad_t = 520, 260, 70, 40, 30
    W, H = panel_w * len(WRITES) + 20, panel_h + pad_b + pad_t + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    for k, (point, title) in enumerate(WRITES.items()):
        x0 = 10 + k * panel_w
        lines = {p: series(runs.get((p, point), [])) for p in ("pcache", "direct")}
        ymax = max([v for s in lines.values() for v in s] + [1])
        tmax = max([len(s) for s in lines.values()] + [1])
        gx, gy, gw, gh = x0 + pad_l, pad_t + 20, panel_w - pad_l - 20, panel_h - 20
        out.append(f'<text x="{x0 + panel_w / 2}" y="{pad_t}" text-anchor="middle" font-weight="bold">{title}</text>')
        out.append(f'<rect x="{gx}" y="{gy}" width="{gw}" height="{gh}" fill="none" stroke="#888"/>')
        for i in range(5):
            v = ymax * i / 4
            y = gy + gh - gh * i / 4
            out.append(f'<line x1="{gx}" y1="{y}" x2="{gx + gw}" y2="{y}" stroke="#eee"/>')
            out.append(f'<text x="{gx - 5}" y="{y + 4}" text-anchor="end">{v / 1000:.0f}k</text>')
        for t in range(0, tmax + 1, 10):
            x = gx + gw * t / tmax
            out.append(f'<text x="{x}" y="{gy + gh + 15}" text-anchor="middle">{t}</text>')
        out.append(f'<text x="{gx + gw / 2}" y="{gy + gh + 32}" text-anchor="middle">seconds</text>')
        for p, s in lines.items():
            if not s:
                continue
            pts = " ".join(f"{gx + gw * (i + 0.5) / tmax:.1f},{gy + gh - gh * v / ymax:.1f}" for i, v in enumerate(s))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS[p]}" stroke-width="1.5"/>')
        for j, p in enumerate(("pcache", "direct")):
            ly = gy + 14 + 16 * j
            out.append(f'<line x1="{gx + 10}" y1="{ly - 4}" x2="{gx + 30}" y2="{ly - 4}" stroke="{COLORS[p]}" stroke-width="2"/>')
            out.append(f'<text x="{gx + 35}" y="{ly}">{PEERS[p]}</text>')
    out.append(f'<text x="10" y="{H - 5}" fill="#555">4 KiB random writes, QD32, 1 queue; IOPS completed in each second '
               '(median over rounds); server pinned to one core</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("res")
    ap.add_argument("--md")
    ap.add_argument("--svg")
    ap.add_argument("--cache-size", default="2G")
    ap.add_argument("--runtime", default="60")
    ap.add_argument("--rounds", default="1")
    a = ap.parse_args()
    runs = load(a.res)
    if not any(p in runs for p in [("pcache", "hot"), ("pcache", "w32over")]):
        sys.exit(f"sustained_report: no sustained points in {a.res}")

    def rs(peer, point):
        return runs.get((peer, point), [])

    def m(peer, point, f):
        return med([f(r) for r in rs(peer, point)])

    def p999(peer, point):
        return m(peer, point, lambda r: r["lat_us"]["p99_9"])

    targets = [
        ("hot set 25 % of the cache, FLUSH every 64, last 30 s", "IOPS",
         m("pcache", "hotf64", last30), "QSD raw O_DIRECT, last 30 s", m("direct", "hotf64", last30), ">=", 5.0),
        ("hot set 25 % of the cache, no FLUSH, last 30 s", "IOPS",
         m("pcache", "hot", last30), "pcache's own first second", m("pcache", "hot", first_second), ">=", 0.8),
        ("working set 2x the cache, FLUSH every 64, last 30 s", "IOPS",
         m("pcache", "ws2xf64", last30), "QSD raw O_DIRECT, last 30 s", m("direct", "ws2xf64", last30), ">=", 1.0),
        ("4 KiB random write QD32, 10 s, overrunning the cache", "IOPS",
         m("pcache", "w32over", lambda r: r["iops"]), "QSD null-co", m("null", "w32over", lambda r: r["iops"]), ">=", 1.0),
        ("4 KiB random read QD32 hits right after those writes", "IOPS",
         m("pcache", "r32after", lambda r: r["iops"]), "QSD null-co", m("null", "r32after", lambda r: r["iops"]), ">=", 1.0),
    ]
    tbl = ["| target | unit | pcache | against | value | ratio | target | result |", "|---|---|---|---|---|---|---|---|"]
    met = 0
    for name, unit, pv, peer, qv, op, lim in targets:
        r = pv / qv if pv is not None and qv else None
        ok = r is not None and (r >= lim if op == ">=" else r <= lim)
        met += ok
        res = "no data" if r is None else ("**pass**" if ok else "**miss**")
        tbl.append(f"| {name} | {unit} | {fmt(pv)} | {peer} | {fmt(qv)} | {'-' if r is None else f'{r:.2f}x'} | {op} {lim:g}x | {res} |")
    for point in ("hot", "hotf64"):
        v = p999("pcache", point)
        ok = v is not None and v <= 2000
        met += ok
        tbl.append(f"| p99.9 latency, {WRITES[point]} | µs | {fmt(v)} | a burst's p99.9 at QD32 is about 200 µs | - | - | <= 2,000 µs | "
                   f"{'no data' if v is None else ('**pass**' if ok else '**miss**')} |")
    n_targets = len(targets) + 2

    rows = ["| point | peer | first s | last 30 s | whole run | p50 µs | p99.9 µs | max µs | reads QD32 after, IOPS |",
            "|---|---|---|---|---|---|---|---|---|"]
    read_of = {v: k for k, v in READS.items()}
    for point, title in WRITES.items():
        for peer in ("pcache", "direct"):
            if not rs(peer, point):
                continue
            rows.append(f"| {title} | {PEERS[peer]} | {fmt(m(peer, point, first_second))} | {fmt(m(peer, point, last30))} | "
                        f"{fmt(m(peer, point, lambda r: r['iops']))} | {fmt(m(peer, point, lambda r: r['lat_us']['p50']), 1)} | "
                        f"{fmt(p999(peer, point), 1)} | {fmt(m(peer, point, lambda r: r['lat_us']['max']))} | "
                        f"{fmt(m(peer, read_of[point], lambda r: r['iops']))} |")

    counters = ["| point | written GiB | written back GiB | written back / written | writeback batches | writes paced | cache_full | GC segments freed |",
                "|---|---|---|---|---|---|---|---|"]
    for point in list(WRITES) + ["w32over"]:
        for s in status_of(a.res, point):
            st = s["stats"]
            w, wb = st["write_bytes"], st["writeback_bytes"]
            counters.append(f"| {point} | {w / 2**30:.1f} | {wb / 2**30:.1f} | {wb / w if w else 0:.2f} | "
                            f"{st.get('writeback_batches', '-')} | {st.get('writes_paced', '-')} | {st['cache_full']} | "
                            f"{st['gc_segs_freed']} |")

    print("\nSustained targets:")
    print("\n".join(tbl))
    print(f"\n{met}/{n_targets} sustained targets met")
    print("\n".join(rows))
    if a.svg:
        svg(runs, a.svg)
        print(f"wrote {a.svg}")
    if not a.md:
        return
    md = ["## Sustained writes\n",
          f"{a.rounds} round(s), each point {a.runtime} s with IOPS recorded every second, interleaved: pcache with its "
          f"defaults ({a.cache_size} cache, a fresh one per point) against qemu-storage-daemon on the raw file with "
          "O_DIRECT, same client. The hot set is the first quarter of the cache's size of the disk, overwritten at "
          "random; the working set of twice the cache cannot fit. After each write point, 10 s of 4 KiB random "
          "reads QD32 of the same region, while writeback still runs. The overrun point writes at random for 10 s "
          "over the hit working set with no byte cap, then reads it. Every figure is the median over rounds; "
          "\"last 30 s\" is the mean IOPS of the last 30 whole seconds.\n",
          "\n".join(tbl), f"\n{met} of {n_targets} sustained targets met.\n",
          "\n".join(rows), ""]
    if a.svg:
        rel = os.path.relpath(a.svg, os.path.dirname(os.path.abspath(a.md)))
        md.append(f"![IOPS over time]({rel})\n")
    md.append("pcache's counters at the end of each sustained point:\n")
    md.append("\n".join(counters))
    md.append("")
    with open(a.md, "a") as f:
        f.write("\n" + "\n".join(md) + "\n")
    print(f"appended the sustained section to {a.md}")


if __name__ == "__main__":
    main()
