#!/usr/bin/env bash
# Device faults and the long run on the GPU machine (issue 16, parts 4 and 5), through the
# element in GStreamer: plugins/tests/gpu_faults.rs built with CUDA, run from a packed directory
# (the one scripts/gst-gpu.sh packs: Debian's GStreamer as .deb files and the diffusers wheel
# for the random SD1.5-shaped models).
#
#   scripts/gpu-faults.sh pack DIR [--test-bin FILE]
#       Here, after `scripts/build-cuda.sh --tests -- --test gpu_faults` (target-cuda). Strips and
#       xz-compresses the test binary into DIR/bin/gpu_faults.xz (FILE: default the newest
#       target-cuda/release/deps/gpu_faults-*). DIR must hold debs/ and wheels/ from
#       `scripts/gst-gpu.sh pack DIR` (e.g. .device/gst; carry it).
#
#   scripts/gpu-faults.sh run DIR [--only LIST] [--frames N]
#       There, from the repository root. LIST: any of device,too-large,oom,long (default all, in
#       that order; one process each). Unpacks GStreamer into /tmp/gst and the binary into
#       /tmp/gpu-faults-bin, reuses or writes the random models in /tmp/gst-gpu-models
#       (scripts/make_random_sd15.py, as gst-gpu.sh does), and runs:
#         device     device=cuda:7: expect "Invalid element settings: device cuda:7 does not exist:
#                    this machine has 1 CUDA device: cuda:0" at start (no model load)
#         too-large  width=height=8192: expect "processing size 8192x8192 is too large for CUDA"
#                    with the device's free/total MiB and the frame's estimated need, before any
#                    work; then NULL, width=height=512 in the same process: 10 frames out
#         oom        all but 8 GiB of free device memory taken by another allocation of the
#                    process, width=height=2048: expect "out of device memory at processing size
#                    2048x2048" with the free/total MiB when it failed; then NULL, 512x512 in the
#                    same process with that memory still taken: 10 frames out
#         long       N frames (default 2000) at 512x512, f16, 4 denoising steps without guidance,
#                    through videotestsrc ! sdcrossframe ! fakesink; device memory used,
#                    resident memory and the cross-frame store every 250 frames, as a table;
#                    nvidia-smi samples every second beside it
#       Prints each part's lines, then PASS/FAIL per part. Logs in $OUT (or /tmp/gpu-faults-out).
#       Environment: the test's SDCROSSFRAME_GPU_* variables (plugins/tests/gpu_faults.rs) pass
#       through; GPU_FAULTS_TIMEOUT (seconds per part, default 420).
#
#   scripts/gpu-faults.sh run DIR --local
#       Smoke test here without a GPU: the system's GStreamer, the test binary from
#       target/debug (or GPU_FAULTS_BIN), the tiny models on the CPU: device, and long with 24
#       frames at 64x64 (the GPU-only parts are skipped).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1

die() { echo "gpu-faults: $*" >&2; exit 1; }
log() { echo "gpu-faults: $*" >&2; }

CMD=${1:-}
[ $# -ge 2 ] || { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2; }
DIR=$2
shift 2

pack() {
    local test_bin=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --test-bin) test_bin=$2; shift 2 ;;
            *) die "pack: unknown option $1" ;;
        esac
    done
    if [ -z "$test_bin" ]; then
        test_bin=$(find target-cuda/release/deps -maxdepth 1 -type f -executable -name 'gpu_faults-*' -printf '%T@ %p\n' 2>/dev/null \
            | sort -n | tail -1 | cut -d' ' -f2)
    fi
    [ -n "$test_bin" ] && [ -f "$test_bin" ] || die "no test binary: run scripts/build-cuda.sh --tests -- --test gpu_faults first"
    readelf -d "$test_bin" | grep -q 'libcuda.so' || die "$test_bin does not link libcuda: not a CUDA build"
    ls "$DIR"/debs/*.deb >/dev/null 2>&1 || die "no $DIR/debs: run scripts/gst-gpu.sh pack $DIR first"
    mkdir -p "$DIR/bin"
    strip -o "$DIR/bin/gpu_faults" "$test_bin" && xz -f -T0 "$DIR/bin/gpu_faults" || die "packing $test_bin failed"
    log "$DIR/bin/gpu_faults.xz ($(du -h "$DIR/bin/gpu_faults.xz" | cut -f1)) from $test_bin"
    log "packed $DIR: $(du -sh "$DIR" | cut -f1) (what travels must stay under 64 MiB)"
}

run() {
    local only="device,too-large,oom,long" frames="" local_mode=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --only) only=$2; shift 2 ;;
            --frames) frames=$2; shift 2 ;;
            --local) local_mode=1; shift ;;
            *) die "run: unknown option $1" ;;
        esac
    done
    local results=${OUT:-/tmp/gpu-faults-out}
    mkdir -p "$results"
    local timeout_s=${GPU_FAULTS_TIMEOUT:-420}
    export HOME=${GPU_FAULTS_HOME:-/tmp/home-gpu-faults}   # the convolution plans, kept between parts
    mkdir -p "$HOME"

    # The test binary.
    local bin=${GPU_FAULTS_BIN:-}
    if [ -z "$bin" ]; then
        if [ "$local_mode" = 1 ]; then
            bin=$(find target/debug/deps -maxdepth 1 -type f -executable -name 'gpu_faults-*' -printf '%T@ %p\n' 2>/dev/null \
                | sort -n | tail -1 | cut -d' ' -f2)
        elif [ -f "$DIR/bin/gpu_faults.xz" ]; then
            bin=/tmp/gpu-faults-bin/gpu_faults
            mkdir -p /tmp/gpu-faults-bin
            if [ ! -f "$bin" ] || [ "$DIR/bin/gpu_faults.xz" -nt "$bin" ]; then
                xz -dc "$DIR/bin/gpu_faults.xz" >"$bin.part" && chmod +x "$bin.part" && mv "$bin.part" "$bin" \
                    || die "cannot unpack $DIR/bin/gpu_faults.xz"
            fi
        fi
    fi
    [ -n "$bin" ] && [ -x "$bin" ] || die "no gpu_faults test binary (pack one, or set GPU_FAULTS_BIN)"
    log "test binary $bin"

    local -a env_vars=()
    if [ "$local_mode" = 1 ]; then
        env_vars=(
            SDCROSSFRAME_GPU_MODEL="$ROOT/tests/fixtures/tiny-sd" SDCROSSFRAME_GPU_CONTROLNET="$ROOT/tests/fixtures/tiny-controlnet"
            SDCROSSFRAME_GPU_DEVICE=cpu SDCROSSFRAME_GPU_DTYPE=f32 SDCROSSFRAME_GPU_SIZE=64
            SDCROSSFRAME_GPU_SETTINGS="steps=2 strength=1.0" SDCROSSFRAME_GPU_FRAMES="${frames:-24}" SDCROSSFRAME_GPU_SAMPLE_EVERY=6
            GST_REGISTRY=/tmp/gpu-faults-registry-local.bin
        )
        only=$(echo ",$only," | sed 's/,too-large,/,/; s/,oom,/,/; s/^,//; s/,$//')
    else
        # GStreamer from the .deb files; cuDNN from PyTorch's wheel when the loader knows none.
        local G=/tmp/gst stamp
        ls "$DIR"/debs/*.deb >/dev/null 2>&1 || die "no .deb files in $DIR/debs (scripts/gst-gpu.sh pack $DIR)"
        stamp=$(find "$DIR/debs" -name '*.deb' -printf '%f %s %T@\n' | sort | md5sum | cut -d' ' -f1)
        if [ "$(cat "$G/.stamp" 2>/dev/null)" != "$stamp" ]; then
            rm -rf "$G" && mkdir -p "$G"
            for d in "$DIR"/debs/*.deb; do dpkg -x "$d" "$G" || die "dpkg -x $d failed"; done
            echo "$stamp" >"$G/.stamp"
        fi
        local cudnn_dir=""
        if ! ldconfig -p 2>/dev/null | grep -q 'libcudnn\.so\.9'; then
            cudnn_dir=$(python3 -c 'import nvidia.cudnn, os; print([os.path.join(p, "lib") for p in nvidia.cudnn.__path__][0])' 2>/dev/null)
        fi
        local lib=$G/usr/lib/x86_64-linux-gnu
        env_vars=(
            LD_LIBRARY_PATH="$lib:$G/lib/x86_64-linux-gnu${cudnn_dir:+:$cudnn_dir}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            GST_PLUGIN_SYSTEM_PATH="$lib/gstreamer-1.0"
            GST_PLUGIN_SCANNER="$lib/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner"
            GST_REGISTRY=/tmp/gpu-faults-registry.bin
        )
        # The random SD1.5-shaped models (shared with scripts/gst-gpu.sh).
        local models=${GST_GPU_MODELS_DIR:-/tmp/gst-gpu-models}
        if [ -z "${SDCROSSFRAME_GPU_MODEL:-}" ]; then
            if [ ! -f "$models/.complete" ]; then
                if ! python3 -c "import diffusers, transformers" 2>/dev/null; then
                    local wheel
                    wheel=$(ls "$DIR"/wheels/diffusers-*.whl 2>/dev/null | head -1)
                    [ -n "$wheel" ] || die "diffusers is not importable and $DIR/wheels has no diffusers wheel"
                    [ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile \
                        --no-cache-dir --target /tmp/site "$wheel" "$DIR"/wheels/extra/*.whl 2>/dev/null \
                        || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheel" \
                        || die "installing $wheel failed"
                    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
                fi
                log "writing random SD1.5-shaped models into $models"
                rm -rf "$models"
                python3 scripts/make_random_sd15.py "$models" tests/fixtures/tiny-sd/tokenizer || die "make_random_sd15.py failed"
                touch "$models/.complete"
            fi
            env_vars+=(SDCROSSFRAME_GPU_MODEL="$models/sd" SDCROSSFRAME_GPU_CONTROLNET="$models/cn")
        fi
        [ -n "$frames" ] && env_vars+=(SDCROSSFRAME_GPU_FRAMES="$frames")
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu-faults: GPU: /'
    fi

    local -A test_of=([device]=missing_device_fails_at_start [too-large]=too_large_then_smaller_works
        [oom]=out_of_memory_then_recovers [long]=long_run)
    local -a verdicts=()
    local status=0 part
    for part in ${only//,/ }; do
        local name=${test_of[$part]:-}
        [ -n "$name" ] || die "unknown part $part (device, too-large, oom, long)"
        local smi=""
        if [ "$part" = long ] && [ "$local_mode" = 0 ] && command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -l 1 >"$results/nvidia-smi-long.csv" 2>/dev/null &
            smi=$!
        fi
        echo "== $part: $bin --include-ignored --exact $name"
        local t0=$EPOCHREALTIME rc
        env "${env_vars[@]}" timeout "$timeout_s" "$bin" --include-ignored --exact "$name" --nocapture --test-threads=1 \
            >"$results/$part.log" 2>&1
        rc=$?
        [ -n "$smi" ] && kill "$smi" 2>/dev/null
        local secs
        secs=$(awk "BEGIN { printf \"%.0f\", $EPOCHREALTIME - $t0 }")
        grep -E '^gpu-faults:|^\| |panicked|FAIL' "$results/$part.log" | grep -v '^gpu-faults: pipeline:' | cut -c1-1200
        if [ -n "$smi" ] && [ -s "$results/nvidia-smi-long.csv" ]; then
            awk -F', ' '{ if (min == "" || $2 < min) min = $2; if ($2 > max) max = $2; n++ } END {
                printf "gpu-faults: nvidia-smi during the long run: %d samples, memory.used %d to %d MiB\n", n, min, max }' \
                "$results/nvidia-smi-long.csv"
        fi
        if [ "$rc" = 0 ] && grep -q '^gpu-faults: PASS' "$results/$part.log"; then
            verdicts+=("PASS $part ($secs s)")
        else
            local why="exit $rc"
            [ "$rc" = 124 ] && why="timed out after $timeout_s s"
            verdicts+=("FAIL $part ($why, $secs s; log $results/$part.log)")
            tail -5 "$results/$part.log"
            status=1
        fi
    done
    echo
    for v in "${verdicts[@]}"; do echo "gpu-faults: $v"; done
    return $status
}

case "$CMD" in
    pack) pack "$@" ;;
    run) run "$@" ;;
    *) die "usage: scripts/gpu-faults.sh pack|run DIR [options]" ;;
esac
