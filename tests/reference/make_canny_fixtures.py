#!/usr/bin/env python3
"""Reference edges from OpenCV's Canny for `tests/canny.rs`.

Run from the repository root with the reference venv (opencv-python-headless 5.0.0.93):

    /work/refvenv/bin/python tests/reference/make_canny_fixtures.py   # or .venv-ref/bin/python

Needs `../shared/media/*.mp4` (override with CANNY_MEDIA_DIR). Deterministic: a second run
rewrites byte-identical files. Everything goes to tests/fixtures/canny/ (wiped first):

  frames/<clip>-f<index>-512.png       RGB, 512x512, resized with cv2.INTER_AREA (6 frames per
                                       clip, spread evenly over the clip)
  frames/<clip>-f<index>-orig.png      RGB, the original size (one frame per clip)
  frames/<clip>-f<index>-512-gray.png  8-bit gray (cv2.COLOR_RGB2GRAY of a 512x512 frame)
  synthetic/<name>.png                 edge cases made here (gray or RGB)
  edges/<case>.png                     cv2.Canny's output as a 1-bit gray PNG (0/255 once read)
  cases.json                           {"opencv": version, "threads": n, "cases": [...]}, each
                                       case {"name", "input", "channels", "low", "high",
                                       "l2", "output", "single_thread_same"}

The frames are RGB because the original pipeline calls cv2.Canny on an RGB frame (channel order
matters: on equal magnitudes OpenCV keeps the first channel's gradient). cv2.Canny runs with
OpenCV's default thread count. `single_thread_same` records whether cv2.setNumThreads(1) gives
the same edges: for 1-channel images wider and taller than 3 pixels OpenCV 5 then hands Canny to
Intel IPP (ipp_hal_canny refuses to run multi-threaded), which is a different implementation.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "canny"
MEDIA = Path(os.environ.get("CANNY_MEDIA_DIR", ROOT.parent / "shared" / "media"))
CLIPS = ["portrait-540x960-25fps.mp4", "woman-960x720-25fps.mp4"]
FRAMES_PER_CLIP = 6
PNG = [cv2.IMWRITE_PNG_COMPRESSION, 9]

FRAME_THRESHOLDS = [(50, 100, False), (100, 200, False), (0, 0, False), (50, 100, True)]


def write_png(path: Path, image: np.ndarray) -> None:
    """Write gray or RGB (converted to OpenCV's BGR for imwrite) losslessly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    if not cv2.imwrite(str(path), data, PNG):
        sys.exit(f"could not write {path}")


def write_edges(path: Path, edges: np.ndarray) -> None:
    """Write a 0/255 edge map as a 1-bit PNG (readers expand it back to 0/255)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(edges == 255).save(path, optimize=True)
    assert np.array_equal(np.array(Image.open(path).convert("L")), edges), f"{path} did not round-trip"


def read_frames(clip: Path, picks: int) -> list[tuple[int, np.ndarray]]:
    """`picks` RGB frames spread evenly over the clip, read sequentially (seeking is inexact)."""
    cap = cv2.VideoCapture(str(clip))
    if not cap.isOpened():
        sys.exit(f"cannot open {clip}")
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(bgr)
    cap.release()
    if len(frames) < picks:
        sys.exit(f"{clip} has only {len(frames)} frames")
    indices = [int((k + 0.5) * len(frames) / picks) for k in range(picks)]
    return [(i, cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB)) for i in indices]


def synthetic() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240607)
    s: dict[str, np.ndarray] = {}
    s["flat-gray"] = np.full((40, 50), 137, np.uint8)
    s["flat-rgb"] = np.full((40, 50, 3), (10, 200, 90), np.uint8)
    s["zeros-rgb"] = np.zeros((17, 23, 3), np.uint8)
    s["full-255-gray"] = np.full((17, 23), 255, np.uint8)

    # One-pixel lines: horizontal, vertical, both diagonals, on a dark background.
    lines = np.full((48, 64), 20, np.uint8)
    lines[10, 5:60] = 230
    lines[5:44, 30] = 230
    for k in range(30):
        lines[12 + k, 2 + k] = 255
        lines[40 - k, 33 + k] = 180
    lines[0, :] = 255  # a line on the very first row
    lines[:, 63] = 255  # and on the last column
    s["lines-gray"] = lines
    lines_rgb = np.zeros((48, 64, 3), np.uint8)
    lines_rgb[..., 0] = lines
    lines_rgb[..., 1] = np.roll(lines, 3, axis=1)
    lines_rgb[..., 2] = np.roll(lines, -2, axis=0)
    s["lines-rgb"] = lines_rgb

    # Tiny and thin images (OpenCV's thread split and IPP limits sit around 3-4 pixels).
    s["width1-gray"] = rng.integers(0, 256, (37, 1), dtype=np.uint8)
    s["width1-rgb"] = rng.integers(0, 256, (37, 1, 3), dtype=np.uint8)
    s["height1-gray"] = rng.integers(0, 256, (1, 41), dtype=np.uint8)
    s["height1-rgb"] = rng.integers(0, 256, (1, 41, 3), dtype=np.uint8)
    s["1x1-gray"] = np.array([[200]], np.uint8)
    s["2x2-rgb"] = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    s["3x3-gray"] = rng.integers(0, 256, (3, 3), dtype=np.uint8)
    s["4x5-gray"] = rng.integers(0, 256, (5, 4), dtype=np.uint8)
    s["width2-rgb"] = rng.integers(0, 256, (30, 2, 3), dtype=np.uint8)

    # Values at 0 and 255 only: the largest gradients (|dx| + |dy| up to 2040).
    s["binary-noise-gray"] = (rng.integers(0, 2, (33, 47), dtype=np.uint8) * 255).astype(np.uint8)
    s["binary-noise-rgb"] = (rng.integers(0, 2, (33, 47, 3), dtype=np.uint8) * 255).astype(np.uint8)
    yy, xx = np.mgrid[0:36, 0:36]
    s["checker-gray"] = (((yy // 3 + xx // 3) % 2) * 255).astype(np.uint8)
    s["single-dot-gray"] = np.zeros((9, 9), np.uint8)
    s["single-dot-gray"][4, 4] = 255

    # Smooth shapes with every gradient direction (a disc and a ramp), and noise.
    disc = ((yy - 17.3) ** 2 + (xx - 18.1) ** 2 < 11.5**2).astype(np.uint8) * 160 + 40
    s["disc-gray"] = disc
    s["ramp-rgb"] = np.stack([xx * 7, yy * 7, (xx + yy) * 3], axis=-1).astype(np.uint8)
    s["noise-gray"] = rng.integers(0, 256, (61, 77), dtype=np.uint8)
    s["noise-rgb"] = rng.integers(0, 256, (61, 77, 3), dtype=np.uint8)
    # Equal magnitudes in several channels with different directions (OpenCV keeps the first).
    tie = np.zeros((24, 24, 3), np.uint8)
    tie[:, 12:, 0] = 100  # vertical edge in R
    tie[12:, :, 1] = 100  # horizontal edge in G, same magnitude
    tie[..., 2] = tie[..., 0].T  # B: R transposed
    s["channel-tie-rgb"] = tie
    s["smooth-noise-rgb"] = cv2.GaussianBlur(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), (0, 0), 2.0)
    return s


SYNTHETIC_THRESHOLDS = [
    (50, 100, False),
    (0, 0, False),
    (100, 200, False),
    (50, 100, True),
]
# Extra threshold sets on a few images: fractional thresholds (floor, and squaring before the
# floor for L2), equal thresholds, very high thresholds (L2 clamps at 32767 before squaring).
EXTRA_THRESHOLDS = {
    "noise-gray": [(50.5, 100.7, False), (30.5, 60.25, True), (300, 300, False), (1, 40000, True)],
    "noise-rgb": [(50.5, 100.7, False), (30.5, 60.25, True), (0, 2000, False), (1000, 1000, True)],
    "smooth-noise-rgb": [(10, 30, False), (10, 30, True), (5.9, 6.1, False)],
    "binary-noise-rgb": [(1019, 1021, False), (1019.9, 1020.1, True)],
}


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    inputs: list[tuple[str, str, np.ndarray, list]] = []  # (name, relative path, image, thresholds)

    for clip in CLIPS:
        stem = clip.split("-")[0]
        picks = read_frames(MEDIA / clip, FRAMES_PER_CLIP)
        for n, (index, rgb) in enumerate(picks):
            small = cv2.resize(rgb, (512, 512), interpolation=cv2.INTER_AREA)
            name = f"{stem}-f{index:03d}-512"
            inputs.append((name, f"frames/{name}.png", small, FRAME_THRESHOLDS))
            if n == FRAMES_PER_CLIP // 2:
                gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
                inputs.append((f"{name}-gray", f"frames/{name}-gray.png", gray, FRAME_THRESHOLDS))
            if n == 1:
                name = f"{stem}-f{index:03d}-orig"
                inputs.append((name, f"frames/{name}.png", rgb, FRAME_THRESHOLDS))

    for name, image in synthetic().items():
        inputs.append((name, f"synthetic/{name}.png", image, SYNTHETIC_THRESHOLDS + EXTRA_THRESHOLDS.get(name, [])))

    default_threads = cv2.getNumThreads()
    cases = []
    for name, rel, image, thresholds in inputs:
        write_png(OUT / rel, image)
        back = cv2.imread(str(OUT / rel), cv2.IMREAD_UNCHANGED)
        back = cv2.cvtColor(back, cv2.COLOR_BGR2RGB) if back.ndim == 3 else back
        assert np.array_equal(back, image), f"{rel} did not round-trip"
        for low, high, l2 in thresholds:
            cv2.setNumThreads(default_threads)
            edges = cv2.Canny(image, low, high, L2gradient=l2)
            cv2.setNumThreads(1)
            single = cv2.Canny(image, low, high, L2gradient=l2)
            cv2.setNumThreads(default_threads)
            assert set(np.unique(edges)) <= {0, 255}
            tag = f"{name}-{low:g}-{high:g}" + ("-l2" if l2 else "")
            out_rel = f"edges/{tag}.png"
            write_edges(OUT / out_rel, edges)
            cases.append(
                {
                    "name": tag,
                    "input": rel,
                    "channels": 1 if image.ndim == 2 else image.shape[2],
                    "width": image.shape[1],
                    "height": image.shape[0],
                    "low": float(low),
                    "high": float(high),
                    "l2": l2,
                    "output": out_rel,
                    "edge_pixels": int((edges == 255).sum()),
                    "single_thread_same": bool(np.array_equal(edges, single)),
                }
            )

    meta = {"opencv": cv2.__version__, "threads": default_threads, "cases": cases}
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    differing = [c["name"] for c in cases if not c["single_thread_same"]]
    print(f"{len(cases)} cases from {len(inputs)} images -> {OUT}")
    print(f"single-threaded cv2.Canny differs on {len(differing)} cases: {differing}")


if __name__ == "__main__":
    main()
