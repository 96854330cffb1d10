#!/usr/bin/env python3
"""Executed warp instructions of a kernel between its CTA barriers.

Input: the CSV of `ncu -i REPORT --page source --csv --print-source sass` for
a report with the SourceCounters section (run.sh writes sass_g2_sim.csv).
Prints, per stretch of SASS that ends at a BAR instruction (the code between
two barriers in address order), the executed warp instructions per CTA, the
share of stall samples and a few telling opcodes, so that the stretches can
be matched to the kernel's phases.

    sass_phases.py sass_g2_sim.csv [CTAS]   (CTAS: the grid size, default 8192)
"""
import collections
import csv
import sys


def main():
    path = sys.argv[1]
    ctas = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    rows = list(csv.reader(open(path)))
    header = next(i for i, r in enumerate(rows) if "Address" in r)
    hdr, data = rows[header], rows[header + 1:]
    col = {k: hdr.index(k) for k in ("Address", "Source", "Instructions Executed",
                                      "Warp Stall Sampling (All Samples)")}
    base = int(data[0][col["Address"]], 16)
    total = sum(int(r[col["Instructions Executed"]] or 0) for r in data)
    samples = sum(int(r[col["Warp Stall Sampling (All Samples)"]] or 0) for r in data)
    print(f"{total / ctas:.0f} warp instructions per CTA, {samples} stall samples")
    print(f"{'from':>8} {'to':>8} {'instr/CTA':>10} {'share':>6} {'stalls':>6}  opcodes")
    start, ex, st, ops = 0, 0, 0, collections.Counter()
    telling = ("LDSM", "HMMA", "LDG", "REDUX", "VOTE", "SHFL", "ATOMS", "MUFU", "LDS.128", "STS")
    for r in data:
        addr = int(r[col["Address"]], 16) - base
        src = r[col["Source"]].strip()
        op = src.split()[1] if src.startswith("@") else src.split()[0]
        ex += int(r[col["Instructions Executed"]] or 0)
        st += int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        if any(op.startswith(t) for t in telling):
            ops[op.split(".")[0]] += 1
        if op.startswith("BAR") or op == "EXIT" and addr == int(data[-1][col["Address"]], 16) - base:
            if ex:
                tell = " ".join(f"{k}x{v}" for k, v in ops.most_common(6))
                print(f"{start:#8x} {addr:#8x} {ex / ctas:10.0f} {100 * ex / total:5.1f}% "
                      f"{100 * st / max(samples, 1):5.1f}%  {tell}")
            start, ex, st, ops = addr + 16, 0, 0, collections.Counter()
    if ex:
        print(f"{start:#8x} {'end':>8} {ex / ctas:10.0f} {100 * ex / total:5.1f}% {100 * st / max(samples, 1):5.1f}%")


if __name__ == "__main__":
    main()
