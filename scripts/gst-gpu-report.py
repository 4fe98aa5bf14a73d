#!/usr/bin/env python3
"""gst-gpu-report.py RESULTS LABEL...: the markdown report of scripts/gst-gpu.sh run.

Reads, per LABEL, RESULTS/LABEL.times (launch and exit wall-clock times, exit code, output files'
mtimes), RESULTS/LABEL.stdout (gst-launch's output, each line prefixed with the wall clock) and
RESULTS/LABEL.log (GST_DEBUG=sdcrossframe:7), and RESULTS/bench-CONFIG.txt and diffusers-CONFIG.txt
when present (copied as they are). How each
number is taken is described in scripts/gst-gpu.sh's header. Standard library only."""

import re
import statistics
import sys
from pathlib import Path

UNITS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}
DURATION = re.compile(r"([A-Za-z][A-Za-z ]*?) ([0-9.]+)(ns|µs|us|ms|s)\b")
LOG_TIME = re.compile(r"^(\d+):(\d\d):(\d\d\.\d+)\s")
FRAME_LINE = re.compile(r"frame at (\d+)x(\d+): (.*)$")
LOADED = re.compile(r"Loaded .* in ([0-9.]+) s")
SUMMARY = re.compile(r"(\d+ frames, per frame: .*)$")
ANCHOR = re.compile(r"frame (\d+) is a new anchor: (.*)$")


def log_seconds(line):
    m = LOG_TIME.match(line)
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else None


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def read_times(path):
    info, mtimes = {}, {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(" ")
        if key == "mtime":
            name, t = rest.split()
            mtimes[int(re.sub(r"\D", "", name))] = float(t)
        else:
            info[key] = rest
    return info, [mtimes[i] for i in sorted(mtimes)]


def analyse(results, label):
    info, mtimes = read_times(results / f"{label}.times")
    start, end = float(info["start"]), float(info["end"])
    frames, skip = int(info["frames"]), int(info["skip"])
    row = {"label": label, "input": info.get("input", "?"), "rc": info.get("rc", "?"), "frames": frames,
           "written": len(mtimes), "skip": skip, "wall": end - start}

    playing = prerolled = None
    stdout = results / f"{label}.stdout"
    if stdout.exists():
        for line in stdout.read_text(errors="replace").splitlines():
            t, _, text = line.partition(" ")
            if "Setting pipeline to PLAYING" in text and playing is None:
                playing = float(t)
            elif "Pipeline is PREROLLED" in text and prerolled is None:
                prerolled = float(t)

    load_s = load_at = None
    stages, summaries, anchors = [], [], []
    log = results / f"{label}.log"
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if (m := LOADED.search(line)) and load_s is None:
                load_s, load_at = float(m[1]), log_seconds(line)
            elif m := FRAME_LINE.search(line):
                stages.append({name.strip(): float(v) * UNITS[u] for name, v, u in DURATION.findall(m[3])})
            elif m := SUMMARY.search(line):
                summaries.append(m[1])
            elif m := ANCHOR.search(line):
                anchors.append(f"{m[1]} ({m[2]})")
    row.update(load=load_s, summaries=summaries, anchors=anchors, frame_lines=len(stages))

    if mtimes:
        row["first_out"] = mtimes[0] - start
        # Log times count from GStreamer's initialisation, a few ms after the launch.
        row["first_frame"] = row["first_out"] - load_at if load_at is not None else None
        row["playing_to_first"] = mtimes[0] - playing if playing is not None else None
        row["prerolled"] = prerolled - start if prerolled is not None else None
        steady = mtimes[skip:]
        row["steady_ms"] = (steady[-1] - steady[0]) / (len(steady) - 1) * 1e3 if len(steady) >= 2 else None
        row["steady_n"] = len(steady)
    steady_stages = stages[skip:]
    if steady_stages:
        names = list(steady_stages[0])
        row["stage_ms"] = {n: statistics.median(s.get(n, 0.0) for s in steady_stages) for n in names}
        row["element_ms"] = statistics.median(sum(s.values()) for s in steady_stages)
    return row


def bench_rows(results):
    """{config: (first+prev frame ms, no-stage-syncs ms)} from bench-CONFIG.txt."""
    out = {}
    for path in sorted(results.glob("bench-*.txt")):
        config = path.stem[len("bench-"):]
        lines = path.read_text(errors="replace").splitlines()
        # A stream-batch run is compared with the bench's stream batch.
        if any(line.startswith("| stream batch first+prev") for line in lines):
            lines = [line for line in lines if line.startswith("| stream batch first+prev")]
        for line in lines:
            if line.startswith("| attention first+prev") or line.startswith("| stream batch first+prev"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                try:
                    out[config] = (float(cells[1]), float(cells[3]))
                except (IndexError, ValueError):
                    pass
                break
    return out


def main():
    results = Path(sys.argv[1])
    labels = sys.argv[2:]
    rows = [analyse(results, label) for label in labels if (results / f"{label}.times").exists()]
    bench = bench_rows(results)
    gpu = ((results / "gpu.txt").read_text().strip() if (results / "gpu.txt").exists() else "") or "GPU ?"
    print(f"## sdcrossframe through GStreamer ({gpu})")
    print()
    print("| run | input | frames written | wall s | model load s | launch to first output s | first frame s "
          "| PLAYING to first output s | steady ms/frame (output mtimes) | element ms/frame (trace, median) "
          "| element stages, median ms | anchors | bench first+prev ms (no stage syncs) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        config = r["label"].split("-")[0]
        b = bench.get(config)
        stages = ", ".join(f"{n} {v:.2f}" for n, v in r.get("stage_ms", {}).items()) or "-"
        written = f"{r['written']}/{r['frames']}" + ("" if r["rc"] == "0" else f" (exit {r['rc']})")
        steady = fmt(r.get("steady_ms"))
        if r.get("steady_ms") is not None:
            steady += f" (frames {r['skip']}..{r['skip'] + r['steady_n'] - 1})"
        print(f"| {r['label']} | {r['input']} | {written} | {fmt(r['wall'])} | {fmt(r['load'])} "
              f"| {fmt(r.get('first_out'), 2)} | {fmt(r.get('first_frame'), 2)} | {fmt(r.get('playing_to_first'), 3)} "
              f"| {steady} | {fmt(r.get('element_ms'))} | {stages} | {len(r['anchors'])} "
              f"| {f'{b[0]:.1f} ({b[1]:.1f})' if b else '-'} |")
    print()
    print("launch to first output: the first output file's mtime minus the launch; first frame: that minus the "
          "log time of the element's \"Loaded\" line; PLAYING to first output is about 0 (even slightly negative) by "
          "construction: a file pipeline only reaches PAUSED once the first frame has gone through the element "
          "to the sink, so it measures nothing about start-up. Steady ms/frame: the "
          "interval between output files after the skipped frames; element ms/frame: the element's own per-frame "
          "trace (read + prepare + diffuse + write) over the same frames.")
    print()
    for r in rows:
        for s in r["summaries"]:
            print(f"- {r['label']} stop summary: {s}")
        if r["anchors"]:
            print(f"- {r['label']} anchors: {', '.join(r['anchors'][:8])}{' ...' if len(r['anchors']) > 8 else ''}")
        if r["frame_lines"] == 0:
            print(f"- {r['label']}: no per-frame trace lines in the log (GST_DEBUG=sdcrossframe:7)")
    for path in sorted(results.glob("bench-*.txt")) + sorted(results.glob("diffusers-*.txt")):
        print()
        print(f"### {path.name}")
        print()
        print("```text")
        print(path.read_text(errors="replace").rstrip())
        print("```")

if __name__ == "__main__":
    main()
