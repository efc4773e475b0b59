"""Plot the latest results: neuralde's time divided by each peer's, per workload.

    python benchmarks/plot_results.py [--platform cpu|gpu] [--out benchmarks/results/ratios_cpu.png]

Reads the last run stored in each ``benchmarks/results/W*_<platform>.json``
(one table per workload and mode) and draws, for every table, the ratio
``neuralde time / other time`` for the peers and the floor (log scale; below 1
means neuralde is faster; the floor is always below 1: the ratio to it is the
solver's overhead factor inverted).
"""
from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def latest_tables(platform):
    tables = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", f"W*_{platform}.json"))):
        with open(path) as f:
            history = json.load(f)
        if not history or "baseline" not in history[-1]:
            continue  # W6, W6tree and W7 store rows of their own, not a table against a baseline
        last_date = history[-1]["date"][:13]  # the runs of one invocation (same hour)
        seen = {}
        for run in history:
            if run["date"][:13] == last_date:
                seen[run["title"]] = run  # a later run of the same table replaces an earlier one
        tables.extend(seen.values())
    return tables


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--platform", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", action="store_true", help="print the latest tables as markdown instead")
    parser.add_argument("--summary", action="store_true", help="print one markdown row per table instead")
    ns = parser.parse_args()
    if ns.markdown:
        return print_markdown(latest_tables(ns.platform))
    if ns.summary:
        return print_summary(latest_tables(ns.platform))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = latest_tables(ns.platform)
    if not tables:
        raise SystemExit(f"no results for {ns.platform} in benchmarks/results/")
    labels, groups = [], []
    for t in tables:
        rows = {r["case"]: r for r in t["rows"]}
        base = rows[t["baseline"]]
        mode = t["settings"].get("mode", "")
        kind = ("grad" if t["settings"].get("grad") else "fwd") if "grad" in t["settings"] else ""
        labels.append(f"{t['workload']} {mode} {kind}".strip())
        groups.append([(name, base["time_s"] / r["time_s"]) for name, r in rows.items()
                       if name != t["baseline"] and not name.startswith("neuralde")])
    peers = []
    for g in groups:
        for name, _ in g:
            short = _peer(name)
            if short not in peers:
                peers.append(short)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(labels)), 4.5))
    width = 0.8 / max(len(peers), 1)
    for j, peer in enumerate(peers):
        xs, ys = [], []
        for i, g in enumerate(groups):
            vals = [v for name, v in g if _peer(name) == peer]
            if vals:
                xs.append(i + (j - (len(peers) - 1) / 2) * width)
                ys.append(vals[0])
        ax.bar(xs, ys, width=width, label=peer)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel("neuralde time / other time (log)")
    env = tables[0]
    ax.set_title(f"neuralde vs peers ({env['device']}, jax {env['versions']['jax']}, {env['date'][:10]})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = ns.out or os.path.join(HERE, "results", f"ratios_{ns.platform}.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {os.path.relpath(out)}")


def print_markdown(tables):
    """The latest tables as markdown: time, ratio to neuralde, overhead over
    the floor, compile time and its ratio, accuracy where measured."""
    for t in tables:
        rows = {r["case"]: r for r in t["rows"]}
        base = rows[t["baseline"]]
        print(f"\n**{t['workload']}** {t['title']} ({t['device']}, {t['date']}, jax {t['versions']['jax']}, "
              f"diffrax {t['versions']['diffrax']}, torch {t['versions']['torch']}, neuralde {t['neuralde_commit']})\n")
        acc = "rel_err" if any("rel_err" in r for r in t["rows"]) else ("max_err" if any("max_err" in r for r in
                                                                                          t["rows"]) else None)
        print("| case | time | neuralde / this | this / floor | compile s | neuralde compile / this |"
              + (f" {acc} |" if acc else ""))
        print("|---|---|---|---|---|---|" + ("---|" if acc else ""))
        for name, r in rows.items():
            is_floor = name == t.get("floor")
            ratio = base["time_s"] / r["time_s"]
            fl = r.get("ratio_to_floor")
            comp = r.get("compile_s")
            cr = (base["compile_s"] / comp) if comp and base.get("compile_s") else None
            cells = [name, _ms(r["time_s"]), f"{ratio:.3g}" if name != t["baseline"] else "1",
                     "-" if is_floor or fl is None else f"{fl:.3g}",
                     "-" if comp is None else f"{comp:.2f}",
                     "-" if cr is None or name == t["baseline"] else f"{cr:.2f}"]
            if acc:
                v = r.get(acc)
                cells.append("-" if v is None else f"{v:.1e}")
            print("| " + " | ".join(cells) + " |")


def print_summary(tables):
    """One row per table: neuralde's time, its time divided by each peer's
    (below 1: neuralde faster), its overhead over the floor, compile ratio."""
    print("| workload | neuralde | / diffrax | / odeint | / torchdiffeq | / scipy | / floor | compile / diffrax |")
    print("|---|---|---|---|---|---|---|---|")
    for t in tables:
        rows = {r["case"]: r for r in t["rows"]}
        base = rows[t["baseline"]]
        mode = t["settings"].get("mode", "")
        kind = ("grad" if t["settings"].get("grad") else "fwd") if "grad" in t["settings"] else ""
        cells = [f"{t['workload']} {mode} {kind}".strip(), _ms(base["time_s"])]
        dfx_compile = None
        for peer in ("diffrax", "odeint", "torchdiffeq", "scipy", "floor"):
            match = [r for name, r in rows.items() if peer in name and not name.startswith("neuralde")]
            # W2: the diffrax row to compare with is its exact-gradient default.
            match.sort(key=lambda r: "RecursiveCheckpoint" not in r["case"] and "backprop" not in r["case"])
            if match:
                cells.append(f"{base['time_s'] / match[0]['time_s']:.3g}")
                if peer == "diffrax":
                    dfx_compile = match[0].get("compile_s")
            else:
                cells.append("-")
        cells.append(f"{base['compile_s'] / dfx_compile:.2f}" if dfx_compile and base.get("compile_s") else "-")
        print("| " + " | ".join(cells) + " |")


def _ms(s):
    ms = 1e3 * s
    return f"{ms:.3g} ms" if ms < 1000 else f"{s:.3g} s"


def _peer(name):
    for key in ("diffrax", "odeint", "torchdiffeq", "scipy", "floor"):
        if key in name:
            return key
    return name.split()[0]


if __name__ == "__main__":
    main()
