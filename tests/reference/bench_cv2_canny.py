#!/usr/bin/env python3
"""Per-frame time of cv2.Canny on the Canny reference frames, one thread.

    /work/refvenv/bin/python tests/reference/bench_cv2_canny.py

The counterpart of `cargo bench --bench canny` (benches/canny.rs): the same PNGs
(tests/fixtures/canny/frames: 12 RGB frames at 512x512, the 960x720 frame), the same cases,
the same measure (median over 25 rounds of the mean per-frame time in a round of ~50 ms).
cv2.setNumThreads(1); note that for 1-channel input OpenCV 5 then runs Canny through Intel IPP.
"""

import time
from pathlib import Path

import cv2

FRAMES = Path(__file__).resolve().parents[1] / "fixtures" / "canny" / "frames"


def load(pred, gray):
    names = sorted(p.name for p in FRAMES.iterdir() if pred(p.name))
    out = []
    for name in names:
        bgr = cv2.imread(str(FRAMES / name), cv2.IMREAD_COLOR)
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY if gray else cv2.COLOR_BGR2RGB))
    return out


def bench(frames, low, high, l2):
    def run():
        for f in frames:
            cv2.Canny(f, low, high, L2gradient=l2)

    start = time.perf_counter()
    warm = 0
    while time.perf_counter() - start < 0.3:
        run()
        warm += 1
    per_run = (time.perf_counter() - start) / warm
    reps = max(1, int(-(-0.05 // per_run)))
    rounds = []
    for _ in range(25):
        t = time.perf_counter()
        for _ in range(reps):
            run()
        rounds.append((time.perf_counter() - t) * 1e3 / (reps * len(frames)))
    rounds.sort()
    return rounds[len(rounds) // 2]


def main():
    cv2.setNumThreads(1)
    rgb_512 = load(lambda n: n.endswith("-512.png"), False)
    rgb_960 = load(lambda n: n.endswith("-orig.png") and n.startswith("woman"), False)
    gray_512 = load(lambda n: n.endswith("-512.png"), True)
    assert len(rgb_512) >= 12 and all(f.shape[:2] == (720, 960) for f in rgb_960) and rgb_960
    cases = [
        ("rgb 512x512 (50,100) L1", rgb_512, 50, 100, False),
        ("rgb 960x720 (50,100) L1", rgb_960, 50, 100, False),
        ("rgb 512x512 (50,100) L2", rgb_512, 50, 100, True),
        ("rgb 512x512 (100,200) L1", rgb_512, 100, 200, False),
        ("gray 512x512 (50,100) L1", gray_512, 50, 100, False),
    ]
    print(f"OpenCV {cv2.__version__}, threads {cv2.getNumThreads()}")
    for name, frames, low, high, l2 in cases:
        print(f"cv2.Canny {name:<26} {bench(frames, low, high, l2):8.3f} ms/frame ({len(frames)} frames)")


if __name__ == "__main__":
    main()
