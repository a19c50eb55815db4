#!/usr/bin/python3
"""scale_report.py - the table and the plot of scripts/scale_sim.sh.

Usage: scale_report.py <scale.tsv> <table.md> [<plot.png>]

Reads the rows of the distinct-layer runs (the step time of every P), the last row of
each (platform, P, mode) winning, and writes a Markdown table: per platform and P the
simulated communication time per step of each algorithm and the ratios the targets
are stated in. Rows of the all-layer runs give the check of the distinct-layer
shortcut (all / distinct) where both exist. The plot: time per step against P,
log-log, one line per algorithm and platform (gnuplot).
"""
import csv
import subprocess
import sys

MODES = ["fast", "repro", "torch", "floor"]
NAMES = {"fast": "syncbn FAST", "repro": "syncbn REPRODUCIBLE", "torch": "PyTorch SyncBN pattern",
         "floor": "bare allreduce 2C doubles"}
PLATS = {"fattree_100g": "fat tree 100 Gb/s, 1 us", "ethernet_25g": "Ethernet 25 Gb/s, 20 us"}


def main():
    tsv, md = sys.argv[1], sys.argv[2]
    png = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    t = {}
    for row in csv.DictReader(open(tsv), delimiter="\t"):
        t[(row["platform"], int(row["P"]), row["layers"], row["mode"])] = float(row["step_s"])
    plats = [p for p in PLATS if any(k[0] == p for k in t)]
    lines = ["| platform | P | FAST | REPRO | PyTorch | floor | FAST / floor | PyTorch / FAST | REPRO / FAST |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def us(v):
        return "-" if v is None else f"{v * 1e6:,.0f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    for p in plats:
        for P in sorted({k[1] for k in t if k[0] == p and k[2] == "distinct"}):
            v = {m: t.get((p, P, "distinct", m)) for m in MODES}
            lines.append(f"| {PLATS[p]} | {P} | {us(v['fast'])} | {us(v['repro'])} | {us(v['torch'])} | "
                         f"{us(v['floor'])} | {ratio(v['fast'], v['floor'])} | {ratio(v['torch'], v['fast'])} | "
                         f"{ratio(v['repro'], v['fast'])} |")
    lines.append("")
    lines.append("Times in microseconds of simulated time per training step (53 forward and 53 backward calls).")
    check = [(v / t[(p, P, "distinct", m)], p, P, m) for (p, P, layers, m), v in t.items()
             if layers == "all" and (p, P, "distinct", m) in t]
    if check:
        lo, hi = min(check), max(check)
        lines.append("")
        lines.append(f"All 53 layers against the 6 distinct ones weighted, {len(check)} runs at P <= "
                     f"{max(c[2] for c in check)}: step time ratio {lo[0]:.3f} ({PLATS[lo[1]]}, P = {lo[2]}, {lo[3]}) "
                     f"to {hi[0]:.3f} ({PLATS[hi[1]]}, P = {hi[2]}, {hi[3]}).")
    open(md, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))

    if not png:
        return
    dat = png.rsplit(".", 1)[0] + ".dat"
    plots = []
    with open(dat, "w") as f:
        idx = 0
        for p in plats:
            for m in MODES:
                pts = sorted((k[1], v) for k, v in t.items() if k[0] == p and k[2] == "distinct" and k[3] == m)
                if not pts:
                    continue
                f.write(f"# {p} {m}\n" + "".join(f"{P} {v * 1e3:.9g}\n" for P, v in pts) + "\n\n")
                dash = 1 if p == "fattree_100g" else 2
                plots.append(f"'{dat}' index {idx} with linespoints dt {dash} lc {MODES.index(m) + 1} "
                             f"pt {MODES.index(m) + 4} title '{NAMES[m]}, {PLATS[p]}'")
                idx += 1
    gp = f"""set terminal pngcairo size 1000,700 font ',11'
set output '{png}'
set logscale xy
set xlabel 'ranks P'
set ylabel 'simulated communication time per step (ms)'
set title 'ResNet-50 BN layers, one training step (SimGrid SMPI, ompi collectives)'
set key top left font ',9'
set grid
set xtics (2,4,8,16,32,64,128,256,512,1024,2048,4096)
plot {', '.join(plots)}
"""
    subprocess.run(["gnuplot"], input=gp, text=True, check=True)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
