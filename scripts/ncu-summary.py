#!/usr/bin/env python3
"""Summarises an Nsight Compute CSV of kernel durations: where one UNet + ControlNet step's
GPU time goes, by kernel name.

Input: the output of
  ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
      --csv --page raw --print-units base sdcrossframe-bench ... unet-step --profiler-range
(scripts/bench-gpu.sh --profile runs exactly that). Prints the kernel count, the summed kernel
time, and the kernels grouped by name (mangled C++ template arguments trimmed), largest
first. The summed time against the step's wall time (measured without ncu) tells how much of
a step the GPU is idle, waiting for the host to launch the next kernel.

Usage: ncu-summary.py NCU_CSV [--top N] [--step-ms MS] [--full-names]
Standard library only.
"""
import argparse
import csv
import re
import sys
from collections import defaultdict

METRIC = "gpu__time_duration.sum"


def short_name(name: str) -> str:
    """`void foo::bar<half, 4>(float*, int)` -> `foo::bar`: groups template instances."""
    name = re.sub(r"^void ", "", name.strip())
    name = name.split("(", 1)[0]
    depth, out = 0, []
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out).strip() or name


def read_durations(path: str):
    """Yields (kernel name, duration in ns) for every profiled kernel launch."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header_at = next((i for i, r in enumerate(rows) if "Kernel Name" in r and METRIC in r), None)
    if header_at is None:
        sys.exit(f"ncu-summary: no header with 'Kernel Name' and '{METRIC}' in {path}")
    header = rows[header_at]
    name_col, time_col = header.index("Kernel Name"), header.index(METRIC)
    scale = 1.0
    for row in rows[header_at + 1:]:
        if len(row) <= max(name_col, time_col):
            continue
        value = row[time_col].replace(",", "")
        try:
            ns = float(value)
        except ValueError:
            # The units row: convert to nanoseconds.
            unit = value.strip().lower()
            scale = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6}.get(unit, scale)
            continue
        yield row[name_col], ns * scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--step-ms", type=float, help="the step's wall time without the profiler")
    ap.add_argument("--full-names", action="store_true", help="group by the whole name (GEMM tile shapes apart)")
    args = ap.parse_args()

    total, count = 0.0, 0
    by_name = defaultdict(lambda: [0, 0.0])
    for name, ns in read_durations(args.csv):
        group = by_name[name if args.full_names else short_name(name)]
        group[0] += 1
        group[1] += ns
        total += ns
        count += 1
    if count == 0:
        sys.exit(f"ncu-summary: no kernel rows in {args.csv}")

    print(f"kernels: {count}, summed GPU time {total / 1e6:.2f} ms, mean {total / count / 1e3:.1f} us per kernel")
    if args.step_ms:
        busy = total / 1e6 / args.step_ms
        print(f"step wall time {args.step_ms:.2f} ms: GPU busy {100 * busy:.0f}%, "
              f"idle {args.step_ms - total / 1e6:.2f} ms (launch / host time)")
    print()
    print("| kernel | launches | total ms | share | mean us |")
    print("|---|---:|---:|---:|---:|")
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    for name, (n, ns) in ranked[: args.top]:
        print(f"| {name[:90]} | {n} | {ns / 1e6:.3f} | {100 * ns / total:.1f}% | {ns / n / 1e3:.1f} |")
    rest = ranked[args.top:]
    if rest:
        n = sum(v[0] for _, v in rest)
        ns = sum(v[1] for _, v in rest)
        print(f"| ({len(rest)} other kernel names) | {n} | {ns / 1e6:.3f} | {100 * ns / total:.1f}% | |")


if __name__ == "__main__":
    main()
