#!/usr/bin/env python3
"""gst-gpu-report.py RESULTS LABEL...: the markdown report of scripts/gst-gpu.sh run.
gst-gpu-report.py --streams RESULTS LABEL...: the report of scripts/gst-gpu.sh run --streams (many
streams in one process: aggregate and per-stream rate, per-stream latency, memory).

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


# Fewer outputs per stream than this in the window where every stream ran make the aggregate rough.
MIN_WINDOW_OUTPUTS_PER_STREAM = 4


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


CHAIN = re.compile(r"<(s|out)(\d+):sink> calling chainfunction .*? pts (\d+):(\d\d):(\d\d\.\d+)")


def percentile(values, q):
    """The q-quantile (0..1) of values, linear between the nearest ranks."""
    values = sorted(values)
    if not values:
        return None
    at = q * (len(values) - 1)
    low = int(at)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (at - low)


def analyse_streams(results, label):
    """One --streams run: per stream the output times and each frame's latency (its buffer into
    sK's sink pad to the buffer with the same PTS into outK's), from the GST_SCHEDULING lines."""
    info = {}
    memory = []
    for line in (results / f"{label}.times").read_text().splitlines():
        key, _, rest = line.partition(" ")
        if key == "memory":
            memory.append(float(rest))
        else:
            info[key] = rest
    n_streams, skip = int(info["streams"]), int(info["skip"])
    entered = [dict() for _ in range(n_streams)]
    left = [[] for _ in range(n_streams)]  # (time, pts)
    log = results / f"{label}.log"
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            m = CHAIN.search(line)
            t = log_seconds(line)
            if not m or t is None:
                continue
            k = int(m[2])
            if k >= n_streams:
                continue
            pts = int(m[3]) * 3600 + int(m[4]) * 60 + float(m[5])
            if m[1] == "s":
                entered[k].setdefault(pts, t)
            else:
                left[k].append((t, pts))
    streams = []
    for k in range(n_streams):
        outs = sorted(left[k])
        steady = outs[skip:]
        latencies = [(t - entered[k][pts]) * 1e3 for t, pts in steady if pts in entered[k]]
        fps = (len(steady) - 1) / (steady[-1][0] - steady[0][0]) if len(steady) >= 2 and steady[-1][0] > steady[0][0] else None
        streams.append({"outs": [t for t, _ in outs], "fps": fps, "p50": percentile(latencies, 0.5),
                        "max": max(latencies) if latencies else None, "latencies": latencies})
    # Aggregate: every output while all streams were past their skipped frames and none had finished.
    # Too few outputs in that window (streams that ran mostly one after another, e.g. separate
    # copies loading in turn on a short run) make it a rough number: flagged, not replaced by
    # the sum of the per-stream rates (which assumes the streams ran at once).
    aggregate, window_outputs = None, 0
    if all(len(s["outs"]) > skip for s in streams):
        t0 = max(s["outs"][skip] for s in streams)
        t1 = min(s["outs"][-1] for s in streams)
        if t1 > t0:
            window_outputs = sum(sum(1 for t in s["outs"] if t0 < t <= t1) for s in streams)
            aggregate = window_outputs / (t1 - t0)
    if n_streams == 1 and aggregate is None and streams[0]["fps"]:
        aggregate = streams[0]["fps"]
    baseline = float(info["memory_baseline"]) if "memory_baseline" in info else None
    peak = max(memory) if memory else None
    if peak is not None and baseline is not None:
        peak -= baseline
    all_latencies = [v for s in streams for v in s["latencies"]]
    return {"label": label, "config": info.get("config", "?"), "input": info.get("input", "?"), "n": n_streams,
            "mode": info.get("mode", "?"), "frames": int(info["frames"]), "written": info.get("written", "?"),
            "rc": info.get("rc", "?"), "skip": skip, "streams": streams, "aggregate": aggregate,
            "window_outputs": window_outputs,
            "p50": percentile(all_latencies, 0.5), "max": max(all_latencies) if all_latencies else None,
            "worst_p50": max((s["p50"] for s in streams if s["p50"] is not None), default=None),
            "memory": peak, "memory_kind": info.get("memory_kind", "?"), "baseline": baseline,
            "settings": info.get("settings", ""), "batch_timeout": info.get("batch_timeout")}


def is_rough(r):
    """Whether a many-stream run's aggregate rests on too few outputs made while all its streams ran."""
    return r["n"] > 1 and r["window_outputs"] < MIN_WINDOW_OUTPUTS_PER_STREAM * r["n"]


def streams_report(results, labels):
    rows = [analyse_streams(results, label) for label in labels if (results / f"{label}.times").exists()]
    gpu = ((results / "gpu.txt").read_text().strip() if (results / "gpu.txt").exists() else "") or "no GPU"
    kind = rows[0]["memory_kind"] if rows else "gpu"
    memory_title = ("peak GPU memory MiB (nvidia-smi, above the reading before launch)" if kind == "gpu"
                    else "peak resident memory MiB (VmHWM)")
    print(f"## Many streams in one process ({gpu})")
    print()
    print(f"| config | input | streams | mode | frames written per stream | aggregate fps | per-stream fps min / mean / max "
          f"| latency p50 ms (worst stream's p50) | latency max ms | {memory_title} |")
    print("|---|---|---:|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        fps = [s["fps"] for s in r["streams"] if s["fps"] is not None]
        per = f"{min(fps):.1f} / {statistics.mean(fps):.1f} / {max(fps):.1f}" if fps else "-"
        written = f"{r['written']} of {r['frames']}" + ("" if r["rc"] == "0" else f" (exit {r['rc']})")
        aggregate = fmt(r["aggregate"])
        if is_rough(r):
            aggregate += f" (rough: {r['window_outputs']} outputs while all ran)"
        print(f"| {r['config']} | {r['input']} | {r['n']} | {r['mode']} | {written} | {aggregate} | {per} "
              f"| {fmt(r['p50'])} ({fmt(r['worst_p50'])}) | {fmt(r['max'])} | {fmt(r['memory'], 0)} |")
    print()
    print("Aggregate fps: outputs of all streams from the moment the last stream was past its first "
          f"{rows[0]['skip'] if rows else '?'} outputs to the moment the first stream wrote its last, over that time "
          f"(marked rough with fewer than {MIN_WINDOW_OUTPUTS_PER_STREAM} outputs per stream in it). "
          "Per-stream fps: a stream's outputs after the skipped ones. Latency: per frame, its buffer entering the "
          "element's sink pad to the buffer with the same PTS leaving it (so it includes the frames the element holds "
          "and the time a shared model keeps it waiting), over the same frames.")
    # Shared (batched as the run asked), shared without batching and separate, against each
    # other and against one stream.
    single = {(r["config"], r["input"]): r for r in rows if r["n"] == 1}
    order = ("shared", "unbatched", "separate")
    groups = {}
    for r in rows:
        if r["mode"] in order:
            groups.setdefault((r["config"], r["input"], r["n"]), {})[r["mode"]] = r
    present = [m for m in order if any(m in g for g in groups.values())]
    if groups:

        def ratio(a, b):
            return f"{a / b:.2f}x" if a is not None and b else "-"

        def value(r, key):
            return r[key] if r else None

        names = " / ".join(present)
        over = [m for m in present if m != "separate"] if "separate" in present else []
        print()
        print(f"| config | input | streams | aggregate fps {names} | "
              + "".join(f"{m} over separate | " for m in over)
              + f"aggregate over one stream, {names} | memory over one stream's, {names} |")
        print("|---|---|---:|---|" + "---:|" * len(over) + "---|---|")
        for (config, input_, n), modes in groups.items():
            one = single.get((config, input_))
            runs = [modes.get(m) for m in present]
            rough = " (rough)" if any(r is not None and is_rough(r) for r in runs) else ""
            separate = modes.get("separate")
            cells = [" / ".join(fmt(value(r, "aggregate")) for r in runs)]
            cells += [f"{ratio(value(modes.get(m), 'aggregate'), value(separate, 'aggregate'))}{rough}" for m in over]
            cells.append(" / ".join(ratio(value(r, "aggregate"), value(one, "aggregate")) for r in runs))
            cells.append(" / ".join(ratio(value(r, "memory"), value(one, "memory")) for r in runs))
            print(f"| {config} | {input_} | {n} | " + " | ".join(cells) + " |")
    print()
    for r in rows:
        parts = [f"s{k} {fmt(s['fps'])} fps, p50 {fmt(s['p50'])} ms, max {fmt(s['max'])} ms" for k, s in enumerate(r["streams"])]
        batch = f" (batch-timeout: {r['batch_timeout']})" if r["batch_timeout"] else ""
        print(f"- {r['label']}{batch}: {'; '.join(parts)}")
    for path in sorted(results.glob("bench-*.txt")):
        print()
        print(f"### {path.name}")
        print()
        print("```text")
        print(path.read_text(errors="replace").rstrip())
        print("```")


def main():
    if sys.argv[1] == "--streams":
        streams_report(Path(sys.argv[2]), sys.argv[3:])
        return
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
