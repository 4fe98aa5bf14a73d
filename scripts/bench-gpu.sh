#!/usr/bin/env bash
# GPU benchmark: sdcrossframe-bench (candle, CUDA) next to diffusers on the same card.
#
# Usage (on the GPU machine, from the repository root):
#   scripts/bench-gpu.sh [BENCH_BINARY] [--frame] [--profile]
# BENCH_BINARY: a CUDA build of sdcrossframe-bench (default: .device/sdcrossframe-bench, or
#   .device/sdcrossframe-bench.xz unpacked to /tmp; made by scripts/build-cuda.sh, then
#   `strip` + `xz`).
# --frame: also time whole frames (random SD1.5 weights, 512x512, the original's settings) and
#   the tiny fixture model per frame.
# --profile: only this: time the kernels of one plain UNet + ControlNet step under Nsight Compute
#   (ncu, duration metric only, clocks not locked) and summarise them by kernel name with
#   scripts/ncu-summary.py against the step's wall time measured without ncu (results in
#   ncu-step.csv, ncu-summary.txt); and the same step captured as a CUDA graph and replayed
#   (unet-step --cuda-graph), which shows how much of a step is host-side launch work.
# Python: tests/reference/bench_diffusers.py needs torch and diffusers; when diffusers is not
#   importable, wheels in .device/wheels (pip download diffusers==0.42.1 --no-deps) are
#   installed into /tmp/site without network access.
# Results: printed, and written under $OUT (or /tmp/bench-out) as candle-*.txt, diffusers.txt.
#
# Measured 2026-11-26 on one NVIDIA H100 80GB HBM3 (driver 580.159.04), candle 0.11.1 built with
# scripts/build-cuda.sh (CUDA 13.0, sm_90), torch 2.11.0+cu130, diffusers 0.42.1; SD1.5 shapes,
# random weights, 512x512, batch 2 (CFG), fp16, median of 20 after 3 warm-ups:
#   UNet + ControlNet step        candle    diffusers (SDPA)
#   plain attention               122.0 ms   70.6 ms   (candle 1.73x)
#   2N K/V in up-block attn1      142.3 ms   66.3 ms   (candle 2.15x; +17% vs plain, diffusers +0%)
#   2N K/V in every attn1         155.6 ms
#   peak allocated                4.89 / 7.42 GiB (plain / 2N)   2.50 GiB
# candle frame (512x512, 20 steps x 0.9 = 18 steps, guidance 7.5, cn scale 0.7): first+prev
# 2736 ms/frame (step 139.5 ms, VAE encode 77 ms, decode 153 ms; text encoder 12 ms once),
# attention off 2284 ms/frame (step 114 ms); peak allocated 9.66 / 5.29 GiB.
# Tiny fixture model, 96x64, f32: 530 ms/frame (29 ms/step: launch-bound).
# Rerun 2026-11-27 (same card, same build flags): plain 124.3 ms vs diffusers 52.2 ms; 2N up
# 149.3 vs 57.2 ms; first+prev with a store of projected K/V 149.4 ms (store 105 MiB/step) vs a
# store of attention inputs 148.7 ms (52.5 MiB/step): cross_frame keeps the inputs. Frame:
# first+prev 2821 ms, off 2297 ms.
# Per-op profile (`sdcrossframe-bench ops` vs tests/reference/bench_ops_torch.py, f16, ms,
# candle / torch): attention 2x8x4096x4096x40 with f32 scores 12.76 / SDPA 0.196 (f16 scores
# 5.56); with 8192 keys 24.2 / 0.349; at 1024 tokens 0.89 / 0.042; GroupNorm 2x320x64x64 0.328 /
# 0.047; conv3x3 320 at 64x64 0.663 / 0.078 (640 at 32x32 0.368 / 0.087, 1280 at 16x16 equal);
# linear 2x4096x320 0.183 / 0.033; SiLU and LayerNorm equal. The 7 self-attentions at 4096
# tokens of a UNet + ControlNet call take about 90 of its 124 ms.
# With the fused attention kernel (2026-11-27, one H100, same device run as diffusers):
#   UNet + ControlNet step: plain 68.6 ms, 2N up 69.8, first+prev (store of inputs) 69.5 ms,
#   peak 2.57 GiB; diffusers 63.8 / 49.3 ms (median; min 45.3 / 39.8).
#   Frame at the original's settings (512x512, 18 steps, guidance 7.5, cn 0.7), f16:
#     candle first+prev 1493 ms (VAE encode 77, step 68.7 x 18 = 1263, VAE decode 152; text
#     encoder 9.9 ms once per prompt), peak 5.28 GiB; attention off 1449 ms.
#     diffusers StableDiffusionControlNetImg2ImgPipeline (bench_diffusers_frame.py): plain SDPA
#     1090 ms, first+prev SDPA 1090 ms (peak 4.29 GiB), first+prev with the original's unfused
#     processor 1013 ms. candle / diffusers first+prev SDPA = 1.37.
#   With models::group_norm (one layer-norm kernel per row; next device run, another H100):
#     GroupNorm 2x320x64x64 0.130 ms (candle-nn 0.416, torch 0.049); step first+prev 62.9 ms
#     (plain 60.6); frame first+prev 1369 ms (SDCROSSFRAME_GROUP_NORM=unfused in the same run:
#     1500 ms), off 1326 ms. diffusers in that run: plain SDPA 1500, first+prev SDPA 1392,
#     original processor 1250 ms; diffusers varied by 30% between the two runs (1090 vs 1392).
#   With kernels/group_norm.cu, models::vae_blocks and models::conv (cuDNN or im2col timed per
#   shape; `cudnn` feature), 2026-11-27, one H100, this script with --frame (candle and diffusers
#   in the same run): GroupNorm 2x320x64x64 0.030 ms (torch 0.050); conv3x3 320 at 64x64 0.229
#   ms (im2col 0.662, torch 0.080); step first+prev 43.3 ms (diffusers 35.0 ms for 2N K/V);
#   frame first+prev 888.3 ms (VAE encode 14.9, decode 23.9; peak 4.73 GiB), off 875.0 ms;
#   diffusers pipeline: plain SDPA 942.2, first+prev SDPA 1144.7, original processor 1109.1 ms
#   (candle / diffusers first+prev SDPA = 0.78). A run before (same binary): 825.8 ms against
#   1023.8 / 1147.9 ms; SDCROSSFRAME_CONV=im2col 1180.3 ms, cudnn-only 875.6 ms.
#   With CUDA graphs for the step (step_graphs), fused epilogues, strided attention, 1x1 GEMMs,
#   graph-timed convolution tuning, im2col columns, vectorized GroupNorm and LayerNorm
#   (2026-11-27, one H100, candle and diffusers in one device run; frame --warmup 3 --runs 5):
#   frame first+prev 284.1 ms (rerun 285.0; no stage syncs 278.8), off 265.6 ms; step 14.5 ms
#   replayed; VAE encode 7.9, decode 12.9 ms; peak 5.09 GiB. diffusers: first+prev SDPA 975.8,
#   plain SDPA 1267.2, original processor 1458.8 ms (candle / diffusers first+prev SDPA =
#   0.29). unet-step plain: 18.7 ms eager, 13.7 ms replayed; diffusers 51.3 ms.
#   Plus 8-warp attention blocks (c9dd8ff), same layout of run: frame first+prev 278.5 ms (rerun
#   277.7), off 263.1; step 14.3 ms; diffusers first+prev SDPA 1058.1, plain 1281.9, original
#   processor 1472.0 ms (ratio 0.26); unet-step 18.0 eager / 13.6 replayed, diffusers 38.6 ms.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN=${1:-.device/sdcrossframe-bench}
FRAME=0
PROFILE=0
for a in "$@"; do
    [ "$a" = "--frame" ] && FRAME=1
    [ "$a" = "--profile" ] && PROFILE=1
done
case "$BIN" in --*) BIN=.device/sdcrossframe-bench ;; esac
RESULTS=${OUT:-/tmp/bench-out}
mkdir -p "$RESULTS"

if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
    xz -dc "$BIN.xz" >/tmp/sdcrossframe-bench && chmod +x /tmp/sdcrossframe-bench && BIN=/tmp/sdcrossframe-bench
fi
if [ ! -x "$BIN" ]; then
    echo "bench-gpu: no benchmark binary at $BIN (build it with scripts/build-cuda.sh)" >&2
    exit 1
fi

# Builds with the `cudnn` feature need libcudnn.so.9: use the one PyTorch's wheels bring when the
# loader does not know one.
if ! ldconfig -p 2>/dev/null | grep -q 'libcudnn\.so\.9'; then
    cudnn_dir=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
for root in site.getsitepackages():
    for hit in glob.glob(os.path.join(root, "nvidia", "**", "libcudnn.so.9"), recursive=True):
        print(os.path.dirname(hit)); raise SystemExit
PY
)
    if [ -n "$cudnn_dir" ]; then
        export LD_LIBRARY_PATH=$cudnn_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        echo "bench-gpu: libcudnn.so.9 from $cudnn_dir"
    fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$RESULTS/gpu.txt"
status=0

if [ "$PROFILE" = 1 ]; then
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    [ -n "$NCU" ] || { echo "bench-gpu: ncu (Nsight Compute) not found" >&2; exit 1; }
    # The profiled run reuses this run's convolution choices: tuned under the profiler, its
    # launch overhead would skew them.
    export SDCROSSFRAME_CONV_PLANS="$RESULTS/conv-plans.txt"
    rm -f "$SDCROSSFRAME_CONV_PLANS"
    echo "== candle: unet-step wall time without the profiler, and one step as a CUDA graph, f16"
    "$BIN" --device cuda:0 --dtype f16 --warmup 3 --runs 20 unet-step --cuda-graph 2>&1 | tee "$RESULTS/candle-unet-step.txt"
    step_ms=$(awk -F'|' '/^\| plain attention/ {gsub(/ /, "", $5); print $5}' "$RESULTS/candle-unet-step.txt")
    echo "== ncu: the kernels of one plain step (caches not flushed between kernels)"
    "$NCU" --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --page raw \
        --print-units base "$BIN" --device cuda:0 --dtype f16 --warmup 2 --runs 1 unet-step --profiler-range \
        >"$RESULTS/ncu-step.csv" 2>"$RESULTS/ncu-step.err" || { tail -5 "$RESULTS/ncu-step.err"; exit 1; }
    python3 scripts/ncu-summary.py "$RESULTS/ncu-step.csv" --top 40 ${step_ms:+--step-ms "$step_ms"} \
        | tee "$RESULTS/ncu-summary.txt"
    exit $?
fi

echo "== candle: sdcrossframe-bench attention (fused kernel vs unfused), f16"
"$BIN" --device cuda:0 --dtype f16 --warmup 3 --runs 20 attention 2>&1 | tee "$RESULTS/candle-attention.txt" || status=1

echo "== candle: sdcrossframe-bench unet-step, f16"
"$BIN" --device cuda:0 --dtype f16 --warmup 3 --runs 20 unet-step --all-scope 2>&1 | tee "$RESULTS/candle-unet-step.txt" || status=1

if ! python3 -c "import diffusers" 2>/dev/null; then
    if ls .device/wheels/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/wheels/*.whl \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
echo "== diffusers: tests/reference/bench_diffusers.py, fp16, SDPA"
PYTHONUNBUFFERED=1 python3 tests/reference/bench_diffusers.py --device cuda --dtype fp16 --warmup 3 --runs 20 2>&1 \
    | tee "$RESULTS/diffusers.txt" || status=1

echo "== per-op profile: candle vs torch, f16"
"$BIN" --device cuda:0 --dtype f16 --warmup 3 --runs 20 ops 2>&1 | tee "$RESULTS/candle-ops.txt" || status=1
python3 tests/reference/bench_ops_torch.py --dtype fp16 2>&1 | tee "$RESULTS/torch-ops.txt" || status=1

if [ "$FRAME" = 1 ]; then
    echo "== candle: sdcrossframe-bench frame, random SD1.5 weights, f16, 512x512"
    # Warm-up 3: the anchor, then two follower frames (run eagerly, then captured as CUDA graphs).
    "$BIN" --device cuda:0 --dtype f16 --warmup 3 --runs 5 frame 2>&1 | tee "$RESULTS/candle-frame.txt" || status=1
    echo "== diffusers: tests/reference/bench_diffusers_frame.py, StableDiffusionControlNetImg2ImgPipeline, fp16"
    # --both: at its fastest ordinary use (prompt embeddings once, device tensors in and out: the
    # baseline to compare with), then the earlier way (prompt strings, PIL in, NumPy out).
    PYTHONUNBUFFERED=1 python3 tests/reference/bench_diffusers_frame.py --dtype fp16 --frames 6 --warmup 2 --both 2>&1 \
        | grep -v "should be kept in float32" | tee "$RESULTS/diffusers-frame.txt" || status=1
    echo "== candle: sdcrossframe-bench frame, tiny fixture model, f32, 96x64"
    "$BIN" --device cuda:0 --dtype f32 --warmup 3 --runs 5 frame --model tests/fixtures/tiny-sd \
        --controlnet tests/fixtures/tiny-controlnet --width 96 --height 64 2>&1 | tee "$RESULTS/candle-frame-tiny.txt" || status=1
fi
exit $status
