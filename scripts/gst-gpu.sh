#!/usr/bin/env bash
# The sdcrossframe element through GStreamer on the GPU machine (which has no GStreamer, no Rust and
# no network, but has PyTorch): Debian 12's GStreamer unpacked into a folder, random-weight
# SD1.5-shaped diffusers directories, JPEG frames of a committed clip, and sdcrossframe-bench with
# the same settings in the same call, so both numbers come from one device run.
#
#   scripts/gst-gpu.sh pack DIR [--bin-from DIR] [--clip FILE] [--frames N]
#       Here (Debian 12 with network and GStreamer tools). Writes into DIR (e.g. .device/gst,
#       ignored by git; carry `.device/gst`, under 64 MiB with the binaries):
#         DIR/debs/*.deb          apt-get download of the GStreamer runtime (about 8 MB)
#         DIR/wheels/*.whl        diffusers (no deps; the GPU machine has torch and transformers)
#                                 and the wheels named in GST_GPU_EXTRA_WHEELS (pip download --no-deps)
#         DIR/frames-WxH/f%03d.jpg  the clip's frames at its own size and at 1280x720 (videoscale)
#         DIR/bin/*.xz            with --bin-from (e.g. target-cuda/release): sdcrossframe-bench and
#                                 libgstsdcrossframe.so, stripped and xz-compressed
#       --clip: default tests/fixtures/media/woman-480x360-3s.mp4; --frames: default 75 (all of it).
#
#   scripts/gst-gpu.sh run DIR [options]
#       There, from the repository root. Unpacks the .deb files into /tmp/gst, installs the diffusers
#       wheel into /tmp/site if diffusers is not importable, writes random SD1.5 + ControlNet
#       directories with scripts/make_random_sd15.py into /tmp/gst-gpu-models (once: a later call on
#       the same warm machine reuses them), then for each configuration and input size runs
#         gst-launch-1.0 -e multifilesrc location=DIR/frames-WxH/f%03d.jpg stop-index=N-1 \
#           caps="image/jpeg,framerate=25/1" ! jpegdec ! videoconvert ! sdcrossframe model=... \
#           controlnet=... device=cuda:0 dtype=f16 width=512 height=512 SETTINGS ! videoconvert \
#           ! jpegenc ! multifilesink location=/tmp/gst-gpu-frames/LABEL/o%03d.jpg
#       with GST_DEBUG="*:2,sdcrossframe:7" into a log, then `sdcrossframe-bench frame` with the same
#       settings, and prints a markdown table (scripts/gst-gpu-report.py).
#       Configurations:
#         original  steps=20 strength=0.9 guidance-scale=7.5 controlnet-scale=0.7 (18 denoising steps)
#         fast      steps=8 strength=0.5 guidance-scale=1 controlnet-scale=0.7 (4 steps, no guidance)
#         lcm4      fast's settings with scheduler=lcm guidance=none vae=TAESD (4 LCM steps, tiny VAE)
#         lcm2      steps=4 strength=0.5, otherwise lcm4 (2 LCM steps)
#         live4     lcm4 with stream-batch=true (the bench times its stream batch too)
#         live2     lcm2 with stream-batch=true
#       GST_GPU_STREAMS=N feeds N elements in one process from a tee (they share one loaded
#       model); stream 0's output files are the ones timed.
#                   (TAESD: random AutoencoderTiny weights next to the random models, or GST_GPU_TAESD;
#                   the bench gets --scheduler lcm --guidance none --vae DIR, diffusers
#                   --scheduler lcm --tiny-vae)
#       --streams LIST (e.g. 1,2,4,8) measures many streams instead of the runs above: for each
#       configuration, input and N, one gst-launch with N independent branches
#         multifilesrc ! jpegdec ! videoconvert ! queue ! sdcrossframe name=sK ... ! queue name=outK
#           ! videoconvert ! jpegenc ! multifilesink location=.../sK-o%03d.jpg
#       once "shared" (the default model-instance-id: one loaded model; batch-timeout=MS added
#       when the element has that property and --batch-timeout is given, else its default),
#       once "separate" (model-instance-id=sK: N loaded copies), and with --modes unbatched
#       once "unbatched" (one model, batch-timeout=0); N=1 runs once ("single").
#       Each frame's latency is the time from its buffer entering sK's sink pad to the buffer
#       with the same PTS entering outK's sink pad (GST_SCHEDULING's chain-function lines in
#       the debug log, ns log clock); the memory is sampled every 0.2 s during the run
#       (nvidia-smi memory.used of the device's GPU, minus the reading before the launch; with
#       --local the process's peak resident memory, VmHWM). The table (gst-gpu-report.py
#       --streams) gives per run the aggregate fps (outputs of all streams while every stream
#       was past its skipped frames and none had finished), each stream's fps (its outputs after
#       the skipped ones), latency p50 and max over those frames, and the peak memory; then
#       shared against separate per N. After each run (this mode or the one above) it prints the
#       line the element logs at stop on its model's step graphs and memory, and on CUDA the
#       device memory read at each frame (tensors, memory pool, CUDA graphs) over the second
#       half of the frames: median and largest.
#       Options:
#         --bin DIR        holds sdcrossframe-bench and libgstsdcrossframe.so, plain or .xz
#                          (default: $GST_GPU_BIN, else DIR/bin, else target-cuda/release); runs
#                          with different folders (two builds compared on one machine) each get
#                          their own unpacked copies and GStreamer registry
#         --frames N       frames per run (default 40)
#         --skip K         frames left out of the steady state (default 5: the anchor, which tunes the
#                          convolutions, the eager and the capturing followers, and two more)
#         --configs LIST   default original,fast
#         --inputs LIST    frame folders by size, default every DIR/frames-*: e.g. 480x360,1280x720
#         --queues         a queue before and after the element (JPEG coding on other threads)
#         --no-bench       skip sdcrossframe-bench
#         --diffusers      also tests/reference/bench_diffusers_frame.py (tensors in and out, prompt
#                          embeddings once; cross-frame with SDPA and with the original processor)
#                          at each configuration's settings, 512x512 (about a minute more)
#         --no-gst         no GStreamer runs (only the bench and/or --diffusers)
#         --no-restart     skip the second start of the first run (start-up with whatever the first
#                          start left behind, e.g. a convolution-plan cache)
#         --streams LIST   many streams in one process (see above), e.g. 1,2,4,8
#         --modes LIST     with --streams: any of shared, unbatched, separate (default shared,separate);
#                          unbatched: one model like shared, with batch-timeout=0 whatever
#                          --batch-timeout says (e.g. --modes shared,unbatched,separate
#                          --batch-timeout -1 measures one model batched, one model unbatched
#                          and separate copies in one call)
#         --batch-timeout MS  with --streams: the shared runs' batch-timeout (when the element has it)
#         --local          smoke test without a GPU: the system's GStreamer, no dpkg -x, no random
#                          models: tests/fixtures/tiny-sd + tiny-controlnet (+ tiny-taesd for the
#                          lcm/live configurations), device cpu, f32, 64x64, steps 2, 4 frames,
#                          skip 1, plugin and bench from target/debug (a shared CARGO_TARGET_DIR:
#                          --bin DIR)
#       Environment overrides: GST_GPU_MODEL / GST_GPU_CONTROLNET (model directories: no
#       make_random_sd15.py), GST_GPU_DEVICE, GST_GPU_DTYPE, GST_GPU_SIZE (WxH processing size),
#       GST_GPU_STEPS (every configuration's steps), GST_GPU_TIMEOUT (seconds per gst-launch,
#       default 300), GST_GPU_BENCH_ARGS (extra `frame` arguments for the bench),
#       GST_GPU_ELEMENT_ARGS (extra element properties), GST_GPU_MODELS_DIR (default
#       /tmp/gst-gpu-models), GST_GPU_DEBUG (GST_DEBUG of the many-streams runs, default
#       "*:2,sdcrossframe:7"; GST_SCHEDULING:5 is added unless it names GST_SCHEDULING: the
#       report times each output by its push into the queue after the element).
#       Results: $OUT (when set, as on the device machine) or /tmp/gst-gpu-out: per run LABEL.log
#       (GStreamer debug log), LABEL.stdout (gst-launch's output, each line prefixed with the wall
#       clock), LABEL.times (launch start, end, exit code, output files' mtimes), the first and last
#       output frame, bench-CONFIG.txt, diffusers-CONFIG.txt, report.md.
#
# How the numbers are taken (scripts/gst-gpu-report.py):
#   wall               launch of gst-launch-1.0 to its exit (process start, plugin scan, model load,
#                      every frame, shutdown).
#   model load         the element's own "Loaded ... in X s" line (loading starts at READY->PAUSED).
#   launch->first out  the first output file's mtime minus the launch time. In a file pipeline the
#                      sink prerolls on the first frame, so PLAYING is only reached after the anchor
#                      frame has gone through the element: "PLAYING to first output" (the file's
#                      mtime minus the wall-clock time of gst-launch's "Setting pipeline to PLAYING"
#                      line) is ~0 by construction (-4 to -6 ms in local runs), and this is the start-up
#                      figure that means something.
#   first frame        the first output file's mtime minus the log time of the "Loaded" line (the
#                      anchor frame, including the convolution tuning when there is no plan cache).
#   steady ms/frame    (mtime of output K+M-1 - mtime of output K) / (M-1) over frames K..N-1: the
#                      pipeline's frame interval, JPEG decoding and encoding included unless
#                      --queues puts them on other threads. File mtimes come from the kernel's
#                      coarse clock (a few ms granularity), hence an average over many frames.
#   element ms/frame   median over the same frames of the element's per-frame trace line (level 7,
#                      "frame at WxH: read .., prepare .., diffuse .., write ..") summed, and each
#                      stage's median; the element's stop summary (level 4, averages over all frames,
#                      the anchor included) is printed as it is.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1

DEBS="libgstreamer1.0-0 gstreamer1.0-plugins-base libgstreamer-plugins-base1.0-0 gstreamer1.0-tools
gstreamer1.0-plugins-good liborc-0.4-0 libunwind8 libdw1 libelf1 libglib2.0-0 libffi8 libpcre2-8-0
libjpeg62-turbo libpng16-16 libcap2"
DIFFUSERS_VERSION=${GST_GPU_DIFFUSERS:-0.42.1}

die() { echo "gst-gpu: $*" >&2; exit 1; }
log() { echo "gst-gpu: $*" >&2; }

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

# The device memory readings at the end of the element's per-frame trace lines (CUDA only:
# `device memory: tensors A MiB, pool B MiB, graphs C MiB`), over the second half of the run's
# frames (the steady state): median and largest of each; nothing when the log has none.
memory_readings() {
    python3 - "$1" <<'PY'
import re, statistics, sys
text = open(sys.argv[1], errors="replace").read()
rows = [tuple(map(int, m.groups())) for m in
        re.finditer(r"device memory: tensors (\d+) MiB, pool (\d+) MiB, graphs (\d+) MiB", text)]
late = rows[len(rows) // 2:]
if late:
    cols = list(zip(*late))
    show = ", ".join(f"{name} {statistics.median(col):.0f} ({max(col)})" for name, col in zip(("tensors", "pool", "graphs"), cols))
    print(f"   device memory over the second half of {len(rows)} frames, median (max): {show} MiB")
PY
}

CMD=${1:-}
[ $# -ge 2 ] || usage
DIR=$2
shift 2

# ---------------------------------------------------------------------------------------------
pack() {
    local clip=tests/fixtures/media/woman-480x360-3s.mp4 frames=75 bin_from=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --clip) clip=$2; shift 2 ;;
            --frames) frames=$2; shift 2 ;;
            --bin-from) bin_from=$2; shift 2 ;;
            *) die "pack: unknown option $1" ;;
        esac
    done
    command -v apt-get >/dev/null || die "pack needs apt-get (Debian 12)"
    command -v gst-launch-1.0 >/dev/null || die "pack needs gst-launch-1.0 (gstreamer1.0-tools) and a decoder for $clip"
    [ -f "$clip" ] || die "no clip $clip"
    mkdir -p "$DIR/debs" "$DIR/wheels"

    log "apt-get download into $DIR/debs"
    rm -f "$DIR"/debs/*.deb
    # shellcheck disable=SC2086 # a list of package names
    (cd "$DIR/debs" && apt-get download $DEBS) || die "apt-get download failed"

    if ! ls "$DIR"/wheels/diffusers-"$DIFFUSERS_VERSION"-*.whl >/dev/null 2>&1; then
        if ls .device/wheels/diffusers-"$DIFFUSERS_VERSION"-*.whl >/dev/null 2>&1; then
            cp .device/wheels/diffusers-"$DIFFUSERS_VERSION"-*.whl "$DIR/wheels/"
        else
            log "pip download diffusers==$DIFFUSERS_VERSION"
            python3 -m pip download -q --no-deps -d "$DIR/wheels" "diffusers==$DIFFUSERS_VERSION" \
                || die "pip download diffusers failed"
        fi
    fi
    if [ -n "${GST_GPU_EXTRA_WHEELS:-}" ]; then
        mkdir -p "$DIR/wheels/extra"
        # shellcheck disable=SC2086 # a list of requirement specifiers
        python3 -m pip download -q --no-deps -d "$DIR/wheels/extra" $GST_GPU_EXTRA_WHEELS \
            || die "pip download $GST_GPU_EXTRA_WHEELS failed"
    fi

    local -a src=(filesrc "location=$clip" ! decodebin ! videoconvert)
    local native
    native=$(gst-launch-1.0 -v "${src[@]}" ! fakesink num-buffers=1 2>/dev/null \
        | grep -o 'video/x-raw[^"]*width=(int)[0-9]*, height=(int)[0-9]*' | tail -1 \
        | sed -E 's/.*width=\(int\)([0-9]+), height=\(int\)([0-9]+)/\1x\2/')
    [ -n "$native" ] || die "cannot read the size of $clip"
    for size in "$native" 1280x720; do
        local out=$DIR/frames-$size
        rm -rf "$out"
        mkdir -p "$out"
        local -a scale=()
        [ "$size" = "$native" ] || scale=(! videoscale ! "video/x-raw,width=${size%x*},height=${size#*x}")
        gst-launch-1.0 -q "${src[@]}" "${scale[@]}" ! jpegenc ! multifilesink location="$out/f%03d.jpg" \
            || die "extracting frames into $out failed"
        # The first N frames only (identity eos-after does not stop at exactly N).
        find "$out" -name 'f*.jpg' | sort | tail -n +"$((frames + 1))" | xargs -r rm -f
        log "$(find "$out" -name 'f*.jpg' | wc -l) frames in $out ($(du -sh "$out" | cut -f1))"
    done

    if [ -n "$bin_from" ]; then
        mkdir -p "$DIR/bin"
        for f in sdcrossframe-bench libgstsdcrossframe.so; do
            [ -f "$bin_from/$f" ] || { log "no $bin_from/$f: not packed"; continue; }
            if ! strip -o "$DIR/bin/$f" "$bin_from/$f" || ! xz -f -T0 "$DIR/bin/$f"; then die "packing $f failed"; fi
            log "$DIR/bin/$f.xz ($(du -h "$DIR/bin/$f.xz" | cut -f1))"
        done
    fi
    log "packed $DIR: $(du -sh "$DIR" | cut -f1) (what travels, binaries included, must stay under 64 MiB)"
}

# ---------------------------------------------------------------------------------------------
# A binary from BIN, unpacked from BIN/NAME.xz into /tmp/gst-gpu-bin/KEY/SUBDIR when needed, KEY
# naming BIN: runs with two --bin folders (an A/B of two builds) must not share an unpacked copy
# (the newer-than test alone would keep the first folder's binary for the second).
find_binary() {
    local bin=$1 name=$2 sub=$3
    if [ -f "$bin/$name" ]; then
        echo "$bin/$name"
    elif [ -f "$bin/$name.xz" ]; then
        local key
        key=$(cd "$bin" && pwd | md5sum | cut -c1-12)
        local dest=/tmp/gst-gpu-bin/$key/$sub/$name
        mkdir -p "$(dirname "$dest")"
        if [ ! -f "$dest" ] || [ "$bin/$name.xz" -nt "$dest" ]; then
            xz -dc "$bin/$name.xz" >"$dest.part" && chmod +x "$dest.part" && mv "$dest.part" "$dest" || return 1
        fi
        echo "$dest"
    fi
}

# diffusers for scripts/make_random_sd15.py and the diffusers baseline: the carried wheel installed
# into /tmp/site (no network there) when python cannot import it.
ensure_diffusers() {
    if ! python3 -c "import diffusers, transformers" 2>/dev/null; then
        local -a wheels=()
        local w
        for w in "$DIR"/wheels/diffusers-*.whl .device/wheels/diffusers-*.whl; do
            [ -f "$w" ] && { wheels=("$w"); break; }
        done
        if [ ${#wheels[@]} -eq 0 ]; then log "diffusers is not importable and no diffusers wheel is in $DIR/wheels"; return 1; fi
        for w in "$DIR"/wheels/extra/*.whl; do [ -f "$w" ] && wheels+=("$w"); done
        if [ ! -d /tmp/site/diffusers ]; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
                "${wheels[@]}" || { log "installing ${wheels[*]} failed"; return 1; }
        fi
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    python3 -c "import torch, diffusers, transformers" || {
        log "python cannot import torch, diffusers and transformers (missing dependencies can be carried with GST_GPU_EXTRA_WHEELS at pack time)"
        return 1
    }
}

run() {
    local bin=${GST_GPU_BIN:-} frames=40 skip=5 configs=original,fast inputs="" queues=0 bench=1 restart=1 local_mode=0
    local diffusers=0 gst=1 streams_list="" modes=shared,separate batch_timeout=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --bin) bin=$2; shift 2 ;;
            --frames) frames=$2; shift 2 ;;
            --skip) skip=$2; shift 2 ;;
            --configs) configs=$2; shift 2 ;;
            --inputs) inputs=$2; shift 2 ;;
            --queues) queues=1; shift ;;
            --no-bench) bench=0; shift ;;
            --diffusers) diffusers=1; shift ;;
            --no-gst) gst=0; shift ;;
            --no-restart) restart=0; shift ;;
            --local) local_mode=1; shift ;;
            --streams) streams_list=$2; shift 2 ;;
            --modes) modes=$2; shift 2 ;;
            --batch-timeout) batch_timeout=$2; shift 2 ;;
            *) die "run: unknown option $1" ;;
        esac
    done
    local device=cuda:0 dtype=f16 size=512x512 steps_override=""
    if [ "$local_mode" = 1 ]; then
        device=cpu dtype=f32 size=64x64 steps_override=2
        [ "$frames" = 40 ] && frames=4
        [ "$skip" = 5 ] && skip=1
        bin=${bin:-target/debug}
    fi
    device=${GST_GPU_DEVICE:-$device}
    dtype=${GST_GPU_DTYPE:-$dtype}
    size=${GST_GPU_SIZE:-$size}
    steps_override=${GST_GPU_STEPS:-$steps_override}
    if [ -z "$bin" ]; then
        if [ -d "$DIR/bin" ]; then bin=$DIR/bin; else bin=target-cuda/release; fi
    fi
    local results=${OUT:-/tmp/gst-gpu-out}
    mkdir -p "$results"
    local timeout_s=${GST_GPU_TIMEOUT:-300}

    # Binaries.
    local plugin bench_bin
    plugin=$(find_binary "$bin" libgstsdcrossframe.so plugin) || die "cannot unpack $bin/libgstsdcrossframe.so.xz"
    [ -n "$plugin" ] || die "no libgstsdcrossframe.so(.xz) in $bin"
    bench_bin=$(find_binary "$bin" sdcrossframe-bench bench) || die "cannot unpack $bin/sdcrossframe-bench.xz"
    [ -n "$bench_bin" ] || { [ "$bench" = 1 ] && log "no sdcrossframe-bench(.xz) in $bin: no bench numbers"; bench=0; }
    local plugin_dir
    plugin_dir=$(cd "$(dirname "$plugin")" && pwd)
    log "plugin $plugin${bench_bin:+, bench $bench_bin}"

    # cuDNN (builds with the `cudnn` feature need libcudnn.so.9): PyTorch's, when the loader knows none.
    local cudnn_dir=""
    if [ "$local_mode" = 0 ] && ! ldconfig -p 2>/dev/null | grep -q 'libcudnn\.so\.9'; then
        cudnn_dir=$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia.cudnn
    for p in nvidia.cudnn.__path__:
        if os.path.exists(os.path.join(p, "lib", "libcudnn.so.9")):
            print(os.path.join(p, "lib")); raise SystemExit
except ImportError:
    pass
import site
for root in site.getsitepackages():
    for hit in glob.glob(os.path.join(root, "nvidia", "**", "libcudnn.so.9"), recursive=True):
        print(os.path.dirname(hit)); raise SystemExit
PY
)
        if [ -n "$cudnn_dir" ]; then log "libcudnn.so.9 from $cudnn_dir"; else log "no libcudnn.so.9 found (fine for builds without cudnn)"; fi
    fi
    local base_ld=${cudnn_dir}${LD_LIBRARY_PATH:+${cudnn_dir:+:}$LD_LIBRARY_PATH}

    # GStreamer: Debian's packages unpacked (only into gst-launch's environment: python keeps the
    # machine's own libraries).
    local -a gst_env
    if [ "$local_mode" = 1 ]; then
        command -v gst-launch-1.0 >/dev/null || die "--local needs gst-launch-1.0"
        gst_env=(GST_PLUGIN_PATH="$plugin_dir" GST_REGISTRY=/tmp/gst-gpu-registry-local-$(printf %s "$plugin_dir" | md5sum | cut -c1-12).bin)
    else
        local G=/tmp/gst
        ls "$DIR"/debs/*.deb >/dev/null 2>&1 || die "no .deb files in $DIR/debs (run: scripts/gst-gpu.sh pack $DIR)"
        local stamp
        stamp=$(find "$DIR/debs" -name '*.deb' -printf '%f %s %T@\n' | sort | md5sum | cut -d' ' -f1)
        if [ "$(cat "$G/.stamp" 2>/dev/null)" != "$stamp" ]; then
            rm -rf "$G" && mkdir -p "$G"
            for d in "$DIR"/debs/*.deb; do dpkg -x "$d" "$G" || die "dpkg -x $d failed"; done
            echo "$stamp" >"$G/.stamp"
            log "GStreamer unpacked into $G"
        fi
        local lib=$G/usr/lib/x86_64-linux-gnu
        gst_env=(
            LD_LIBRARY_PATH="$lib:$G/lib/x86_64-linux-gnu${base_ld:+:$base_ld}"
            GST_PLUGIN_SYSTEM_PATH="$lib/gstreamer-1.0"
            GST_PLUGIN_SCANNER="$lib/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner"
            # One registry per plugin folder: two folders with an sdcrossframe plugin each must not
            # meet in one registry (which of the two elements loads is then not ours to choose).
            GST_REGISTRY=/tmp/gst-gpu-registry-$(printf %s "$plugin_dir" | md5sum | cut -c1-12).bin
            GST_PLUGIN_PATH="$plugin_dir"
            PATH="$G/usr/bin:$PATH"
        )
    fi
    env "${gst_env[@]}" gst-inspect-1.0 sdcrossframe >"$results/gst-inspect.txt" 2>&1 \
        || { tail -20 "$results/gst-inspect.txt"; die "gst-inspect-1.0 sdcrossframe failed (see $results/gst-inspect.txt)"; }
    env "${gst_env[@]}" gst-launch-1.0 --version | head -1

    # Models.
    local model=${GST_GPU_MODEL:-} controlnet=${GST_GPU_CONTROLNET:-} taesd=${GST_GPU_TAESD:-}
    if [ "$local_mode" = 1 ]; then
        model=${model:-tests/fixtures/tiny-sd}
        controlnet=${controlnet:-tests/fixtures/tiny-controlnet}
        taesd=${taesd:-$ROOT/tests/fixtures/tiny-taesd}
    fi
    if [ -z "$model" ] || [ -z "$controlnet" ]; then
        local models=${GST_GPU_MODELS_DIR:-/tmp/gst-gpu-models}
        if [ ! -f "$models/.complete" ] || [ ! -d "$models/taesd" ]; then
            ensure_diffusers || die "cannot write the random models"
            log "writing random SD1.5-shaped models into $models"
            rm -rf "$models"
            local t0=$EPOCHREALTIME
            python3 scripts/make_random_sd15.py "$models" tests/fixtures/tiny-sd/tokenizer || die "make_random_sd15.py failed"
            touch "$models/.complete"
            log "models written in $(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $t0 }") s"
        else
            log "reusing the models in $models"
        fi
        model=$models/sd controlnet=$models/cn
        taesd=${GST_GPU_TAESD:-$models/taesd}
    fi
    model=$(cd "$model" && pwd) controlnet=$(cd "$controlnet" && pwd)

    # Inputs.
    local -a frame_dirs=()
    if [ -n "$inputs" ]; then
        for s in ${inputs//,/ }; do
            [ -d "$DIR/frames-$s" ] || die "no $DIR/frames-$s"
            frame_dirs+=("$DIR/frames-$s")
        done
    else
        # Smallest first: the clip's own frames, then the 1280x720 ones.
        local d
        while read -r _ d; do frame_dirs+=("$d"); done < <(
            for d in "$DIR"/frames-*x*; do
                [ -d "$d" ] || continue
                local s=${d##*/frames-}
                echo "$(( ${s%x*} * ${s#*x} )) $d"
            done | sort -n)
    fi
    [ ${#frame_dirs[@]} -gt 0 ] || die "no frame folders in $DIR (run: scripts/gst-gpu.sh pack $DIR)"

    local -a q=()
    [ "$queues" = 1 ] && q=(queue !)
    local -a runs=()
    local status=0
    # run_one LABEL FRAME_DIR ELEMENT_PROPERTY...
    run_one() {
        local label=$1 frames_dir=$2
        shift 2
        local available
        available=$(find "$frames_dir" -name 'f*.jpg' | wc -l)
        local n=$(( frames < available ? frames : available ))
        local out=/tmp/gst-gpu-frames/$label
        rm -rf "$out" && mkdir -p "$out"
        rm -f "$results/$label".*
        local -a extra=()
        read -r -a extra <<<"${GST_GPU_ELEMENT_ARGS:-}"
        local -a element=(
            sdcrossframe "model=$model" "controlnet=$controlnet" "device=$device" "dtype=$dtype"
            "width=${size%x*}" "height=${size#*x}" "$@" "${extra[@]}"
        )
        local -a pipeline=(
            multifilesrc "location=$frames_dir/f%03d.jpg" start-index=0 "stop-index=$((n - 1))"
            "caps=image/jpeg,framerate=25/1" ! jpegdec ! videoconvert ! "${q[@]}"
        )
        local streams=${GST_GPU_STREAMS:-1}
        if [ "$streams" -gt 1 ]; then
            # N elements fed by a tee (one process: they share the loaded model); stream 0
            # writes o%03d.jpg, which the report times, the others sK-o%03d.jpg.
            pipeline+=(tee name=t)
            for k in $(seq 0 $((streams - 1))); do
                local name=o
                [ "$k" -gt 0 ] && name=s$k-o
                pipeline+=(t. ! queue ! "${element[@]}" ! queue ! videoconvert ! jpegenc ! multifilesink "location=$out/$name%03d.jpg")
            done
        else
            pipeline+=("${element[@]}" ! "${q[@]}" videoconvert ! jpegenc ! multifilesink "location=$out/o%03d.jpg")
        fi
        local shown
        shown=$(printf '%q ' gst-launch-1.0 -e "${pipeline[@]}")
        echo "== $label: $shown"
        {
            echo "label $label"
            echo "input $(basename "$frames_dir" | sed 's/^frames-//')"
            echo "frames $n"
            echo "skip $skip"
            echo "queues $queues"
            echo "settings $*"
            echo "pipeline $shown"
        } >"$results/$label.times"
        local start=$EPOCHREALTIME rc
        env "${gst_env[@]}" GST_DEBUG="*:2,sdcrossframe:7" GST_DEBUG_NO_COLOR=1 GST_DEBUG_FILE="$results/$label.log" \
            timeout "$timeout_s" gst-launch-1.0 -e "${pipeline[@]}" 2>&1 \
            | while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done >"$results/$label.stdout"
        rc=${PIPESTATUS[0]}
        local end=$EPOCHREALTIME
        {
            echo "start $start"
            echo "end $end"
            echo "rc $rc"
            find "$out" -name 'o*.jpg' -printf 'mtime %f %T@\n' | sort
        } >>"$results/$label.times"
        local made
        made=$(find "$out" -name 'o*.jpg' | wc -l)
        grep -h "step graphs of the shared model" "$results/$label.log" | tail -1 | sed 's/^.*step graphs/   step graphs/'
        memory_readings "$results/$label.log"
        if [ "$rc" != 0 ] || [ "$made" != "$n" ]; then
            echo "gst-gpu: $label: gst-launch exit $rc, $made of $n frames written" >&2
            tail -5 "$results/$label.stdout" >&2
            # The element's own first messages (the cause), then the last of all (the fallout).
            grep -E ' (ERROR|WARN) +sdcrossframe ' "$results/$label.log" | head -5 >&2
            grep -E ' (ERROR|WARN) ' "$results/$label.log" | tail -5 >&2
            status=1
        fi
        local last
        last=$(find "$out" -name 'o*.jpg' | sort | tail -1)
        if [ "${GST_GPU_STREAMS:-1}" -gt 1 ]; then
            echo "   $label: frames written per stream: $(for k in $(seq 0 $((${GST_GPU_STREAMS} - 1))); do [ $k = 0 ] && find "$out" -name 'o*.jpg' | wc -l || find "$out" -name "s$k-o*.jpg" | wc -l; done | tr '\n' ' ')"
        fi
        [ -f "$out/o000.jpg" ] && cp "$out/o000.jpg" "$results/$label-first.jpg"
        [ -n "$last" ] && cp "$last" "$results/$label-last.jpg"
        grep -h 'frames, per frame:' "$results/$label.log" | sed -E 's/^.*(frames, per frame:)/\1/' \
            | sed "s/^/   $label stop summary: /"
        runs+=("$label")
    }

    # run_streams LABEL FRAME_DIR N MODE ELEMENT_PROPERTY...: N independent branches in one
    # gst-launch (see the header), the memory sampled while it runs.
    run_streams() {
        local label=$1 frames_dir=$2 n_streams=$3 mode=$4
        shift 4
        local available
        available=$(find "$frames_dir" -name 'f*.jpg' | wc -l)
        local n=$(( frames < available ? frames : available ))
        local out=/tmp/gst-gpu-frames/$label
        rm -rf "$out" && mkdir -p "$out"
        rm -f "$results/$label".*
        local -a extra=()
        read -r -a extra <<<"${GST_GPU_ELEMENT_ARGS:-}"
        local -a pipeline=()
        local k
        for k in $(seq 0 $((n_streams - 1))); do
            local -a per=()
            case "$mode" in
                separate) per=("model-instance-id=s$k") ;;
                shared) [ -n "$batch_timeout" ] && [ "$has_batch_timeout" = 1 ] && per=("batch-timeout=$batch_timeout") ;;
                unbatched) [ "$has_batch_timeout" = 1 ] && per=("batch-timeout=0") ;;
            esac
            pipeline+=(
                multifilesrc "location=$frames_dir/f%03d.jpg" start-index=0 "stop-index=$((n - 1))"
                "caps=image/jpeg,framerate=25/1" ! jpegdec ! videoconvert ! queue !
                sdcrossframe "name=s$k" "model=$model" "controlnet=$controlnet" "device=$device" "dtype=$dtype"
                "width=${size%x*}" "height=${size#*x}" "$@" "${per[@]}" "${extra[@]}"
                ! queue "name=out$k" ! videoconvert ! jpegenc ! multifilesink "location=$out/s$k-o%03d.jpg"
            )
        done
        local shown
        shown=$(printf '%q ' gst-launch-1.0 -e "${pipeline[@]}")
        echo "== $label: $n_streams stream(s), $mode: $shown"
        local gpu=""
        if [ "$local_mode" = 0 ] && command -v nvidia-smi >/dev/null; then
            case "$device" in cuda:*) gpu=${device#cuda:} ;; cuda) gpu=0 ;; esac
        fi
        read_memory() {  # MiB: the GPU's memory in use, or the process's peak resident memory
            if [ -n "$gpu" ]; then
                nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu" 2>/dev/null | head -1 | tr -dc '0-9'
            elif [ -n "${1:-}" ]; then
                awk '/^VmHWM:/ { printf "%d", $2 / 1024 }' "/proc/$1/status" 2>/dev/null
            fi
        }
        local baseline=""
        [ -n "$gpu" ] && baseline=$(read_memory)
        {
            echo "label $label"
            echo "input $(basename "$frames_dir" | sed 's/^frames-//')"
            echo "frames $n"
            echo "skip $skip"
            echo "streams $n_streams"
            echo "mode $mode"
            echo "config ${label%%-*}"
            echo "memory_kind $([ -n "$gpu" ] && echo "gpu" || echo "rss")"
            if [ "$mode" = shared ] && [ "$has_batch_timeout" = 1 ]; then echo "batch_timeout ${batch_timeout:-default}"; fi
            if [ "$mode" = unbatched ] && [ "$has_batch_timeout" = 1 ]; then echo "batch_timeout 0"; fi
            [ -n "$baseline" ] && echo "memory_baseline $baseline"
            echo "settings $*"
            echo "pipeline $shown"
        } >"$results/$label.times"
        local start=$EPOCHREALTIME rc pid
        local gst_debug=${GST_GPU_DEBUG:-*:2,sdcrossframe:7}
        case "$gst_debug" in *GST_SCHEDULING*) ;; *) gst_debug+=",GST_SCHEDULING:5" ;; esac
        env "${gst_env[@]}" GST_DEBUG="$gst_debug" GST_DEBUG_NO_COLOR=1 \
            GST_DEBUG_FILE="$results/$label.log" gst-launch-1.0 -e "${pipeline[@]}" >"$results/$label.stdout" 2>&1 &
        pid=$!
        local deadline=$(( ${start%.*} + timeout_s )) m
        while kill -0 "$pid" 2>/dev/null; do
            m=$(read_memory "$pid")
            [ -n "$m" ] && echo "memory $m" >>"$results/$label.times"
            if [ "$(date +%s)" -ge "$deadline" ]; then
                log "$label: still running after $timeout_s s: stopped"
                kill -INT "$pid" 2>/dev/null; sleep 5; kill -KILL "$pid" 2>/dev/null
            fi
            sleep 0.2
        done
        wait "$pid"
        rc=$?
        [ "$rc" -gt 128 ] && rc=124
        local end=$EPOCHREALTIME
        {
            echo "start $start"
            echo "end $end"
            echo "rc $rc"
        } >>"$results/$label.times"
        local written="" short=0
        for k in $(seq 0 $((n_streams - 1))); do
            local made
            made=$(find "$out" -name "s$k-o*.jpg" | wc -l)
            written+="$made "
            [ "$made" = "$n" ] || short=1
        done
        echo "written ${written% }" >>"$results/$label.times"
        echo "   $label: frames written per stream: $written(of $n)"
        # The element logs its model's step graphs at stop (the last to stop saw every call).
        grep -h "step graphs of the shared model" "$results/$label.log" | tail -1 | sed 's/^.*step graphs/   step graphs/'
        memory_readings "$results/$label.log"
        if [ "$rc" != 0 ] || [ "$short" = 1 ]; then
            echo "gst-gpu: $label: gst-launch exit $rc, frames written per stream: $written(of $n)" >&2
            tail -5 "$results/$label.stdout" >&2
            # The element's own first messages (the cause), then the last of all (the fallout).
            grep -E ' (ERROR|WARN) +sdcrossframe ' "$results/$label.log" | head -5 >&2
            grep -E ' (ERROR|WARN) ' "$results/$label.log" | tail -5 >&2
            status=1
        fi
        # The log is large (a line per buffer and pad); keep what the report reads.
        grep -E '<(s|out)[0-9]+:sink> calling chainfunction|sdcrossframe|Loaded ' "$results/$label.log" >"$results/$label.log.part" \
            && mv "$results/$label.log.part" "$results/$label.log"
        stream_runs+=("$label")
    }
    local has_batch_timeout=0
    grep -q 'batch-timeout' "$results/gst-inspect.txt" && has_batch_timeout=1
    if [ -n "$streams_list" ]; then
        if [ "$has_batch_timeout" = 1 ]; then
            if [ -n "$batch_timeout" ]; then
                log "the element has batch-timeout: shared runs pass batch-timeout=$batch_timeout"
            else
                log "the element has batch-timeout: shared runs use its default"
            fi
        else
            log "the element has no batch-timeout property (no cross-stream batching in this build)"
        fi
    fi
    local -a stream_runs=()

    local -A settings_of=(
        [original]="steps=20 strength=0.9 guidance-scale=7.5 controlnet-scale=0.7"
        [fast]="steps=8 strength=0.5 guidance-scale=1 controlnet-scale=0.7"
        [lcm4]="steps=8 strength=0.5 guidance-scale=1 controlnet-scale=0.7 scheduler=lcm guidance=none vae=$taesd"
        [lcm2]="steps=4 strength=0.5 guidance-scale=1 controlnet-scale=0.7 scheduler=lcm guidance=none vae=$taesd"
        [live4]="steps=8 strength=0.5 guidance-scale=1 controlnet-scale=0.7 scheduler=lcm guidance=none vae=$taesd stream-batch=true"
        [live2]="steps=4 strength=0.5 guidance-scale=1 controlnet-scale=0.7 scheduler=lcm guidance=none vae=$taesd stream-batch=true"
    )
    local prompt="prompt=a watercolor painting of a woman, soft light"
    local first_label="" first_dir=""
    local -a first_settings=()
    for config in ${configs//,/ }; do
        [ -n "${settings_of[$config]:-}" ] || die "unknown configuration $config (original, fast, lcm4, lcm2, live4, live2)"
        case "$config" in lcm*|live*) [ -n "$taesd" ] || die "$config needs a TAESD directory (GST_GPU_TAESD)" ;; esac
        [ "$gst" = 1 ] || continue
        local -a settings
        read -r -a settings <<<"${settings_of[$config]}"
        [ -n "$steps_override" ] && settings[0]=steps=$steps_override
        if [ -n "$streams_list" ]; then
            for d in "${frame_dirs[@]}"; do
                local input n_streams mode
                input=$(basename "$d" | sed 's/^frames-//')
                for n_streams in ${streams_list//,/ }; do
                    [[ "$n_streams" =~ ^[1-9][0-9]*$ ]] || die "--streams: $n_streams is not a stream count"
                    for mode in ${modes//,/ }; do
                        case "$mode" in shared|unbatched|separate) ;; *) die "--modes: unknown mode $mode (shared, unbatched, separate)" ;; esac
                        # One stream is the same run either way.
                        if [ "$n_streams" = 1 ]; then
                            [ "$mode" = "${modes%%,*}" ] || continue
                            mode=single
                        fi
                        run_streams "$config-$input-n$n_streams-$mode" "$d" "$n_streams" "$mode" "${settings[@]}" "$prompt"
                    done
                done
            done
            continue
        fi
        for d in "${frame_dirs[@]}"; do
            local label
            label="$config-$(basename "$d" | sed 's/^frames-//')"
            run_one "$label" "$d" "${settings[@]}" "$prompt"
            if [ -z "$first_label" ]; then first_label=$label first_dir=$d first_settings=("${settings[@]}"); fi
        done
    done
    if [ "$restart" = 1 ] && [ -n "$first_label" ] && [ -z "$streams_list" ]; then
        run_one "$first_label-restart" "$first_dir" "${first_settings[@]}" "$prompt"
    fi

    # The benchmark, same settings (random weights at SD1.5 shapes unless GST_GPU_BENCH_ARGS says).
    if [ "$bench" = 1 ]; then
        local warmup=3 bench_runs=5 bench_size=(--width "${size%x*}" --height "${size#*x}")
        [ "$local_mode" = 1 ] && bench_runs=2 && bench_size+=(--model "$model" --controlnet "$controlnet")
        for config in ${configs//,/ }; do
            local -a args
            read -r -a args <<<"$(sed -E 's/(^| )([a-z-]+)=/\1--\2 /g' <<<"${settings_of[$config]}")"
            if [ -n "$steps_override" ]; then
                for i in "${!args[@]}"; do [ "${args[$i]}" = --steps ] && args[i+1]=$steps_override; done
            fi
            echo "== bench $config: $bench_bin --device $device --dtype $dtype --warmup $warmup --runs $bench_runs frame ${args[*]} ${bench_size[*]} ${GST_GPU_BENCH_ARGS:-}"
            # shellcheck disable=SC2086 # extra arguments split into words on purpose
            LD_LIBRARY_PATH=$base_ld timeout "$timeout_s" "$bench_bin" --device "$device" --dtype "$dtype" \
                --warmup "$warmup" --runs "$bench_runs" frame "${args[@]}" "${bench_size[@]}" ${GST_GPU_BENCH_ARGS:-} \
                2>&1 | tee "$results/bench-$config.txt" || status=1
        done
    fi

    # The diffusers baseline, same settings: tests/reference/bench_diffusers_frame.py at its fastest
    # ordinary use (prompt embeddings once, device tensors in and out), cross-frame variants.
    if [ "$diffusers" = 1 ] && ! ensure_diffusers; then
        log "no diffusers baseline"
        status=1
    elif [ "$diffusers" = 1 ]; then
        local -a dargs=(--dtype fp16 --frames 6 --warmup 2 --variants "sdpa,original")
        [ "$local_mode" = 1 ] && dargs=(--device cpu --dtype fp32 --frames 3 --warmup 1 --size 64 --variants sdpa)
        for config in ${configs//,/ }; do
            # diffusers has no stream batch: the live configurations are the lcm ones there.
            case "$config" in live*) continue ;; esac
            local -a args
            read -r -a args <<<"$(sed -E 's/(^| )([a-z-]+)=/\1--\2 /g' <<<"${settings_of[$config]}")"
            if [ -n "$steps_override" ]; then
                for i in "${!args[@]}"; do [ "${args[$i]}" = --steps ] && args[i+1]=$steps_override; done
            fi
            # The script knows no --guidance / --vae: LCM configurations run LCMScheduler + AutoencoderTiny.
            local -a dset=()
            local skip_next=0
            for a in "${args[@]}"; do
                if [ "$skip_next" = 1 ]; then skip_next=0; continue; fi
                case "$a" in --guidance|--vae|--stream-batch) skip_next=1 ;; *) dset+=("$a") ;; esac
            done
            case "$config" in lcm*|live*) dset+=(--tiny-vae) ;; esac
            args=("${dset[@]}")
            echo "== diffusers $config: tests/reference/bench_diffusers_frame.py ${dargs[*]} ${args[*]}"
            PYTHONUNBUFFERED=1 timeout "$timeout_s" python3 tests/reference/bench_diffusers_frame.py "${dargs[@]}" "${args[@]}" \
                2>&1 | grep -v "should be kept in float32" | tee "$results/diffusers-$config.txt" || status=1
        done
    fi

    [ "$local_mode" = 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$results/gpu.txt" 2>/dev/null
    echo
    if [ -n "$streams_list" ]; then
        python3 scripts/gst-gpu-report.py --streams "$results" "${stream_runs[@]}" | tee "$results/report.md" || status=1
    else
        python3 scripts/gst-gpu-report.py "$results" "${runs[@]}" | tee "$results/report.md" || status=1
    fi
    return $status
}

case "$CMD" in
    pack) pack "$@" ;;
    run) run "$@" ;;
    -h|--help|help) usage 0 ;;
    *) usage ;;
esac
