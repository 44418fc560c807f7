#!/usr/bin/env bash
# The GPU checks of issues 5 and 6, as four calls of the device tool (see ../shared/GPU.md and
# the tool's README): the session has 15 minutes of device time and each call carries 64 MiB,
# so the binaries are built here (xz-compressed) and CIFAR-10 travels packed
# (scripts/cifar10_pack.py) in three pieces, .device/call1, call2 and call3 (ignored folders,
# carried). What a call unpacks stays in $WORK while the machine is warm (30 s between calls),
# and so does a process started in its own session (setsid).
#
#   stage 1 (carry .gl .device/call1 [.device/cache]): GPU, binaries, batch 1; the caches a
#     former lease left in .device/cache (see stage torch); criterion benches on wgpu against
#     PyTorch on CUDA (benches/compare.py; BENCHES=1, off by default: on 2026-11-28 they ran
#     into their 200 s limit before PyTorch's ResNet-50 cases); then the training probes start
#     in the background (stage probes) and the call returns, so that the cold start, kernel
#     compilation and autotuning (over 140 s on a fresh machine), runs while the data travels.
#     PROBES_BG=0 runs them in the call instead, PROFILE=1 then adds ten steps with CubeCL's
#     kernel profiler for the fastest.
#   probes: one short run per candidate BACKEND:CONV:PRECISION in $PROBES on batch 1 (time to
#     the first step, steady images/s in a second epoch of $PROBE_STEPS steps), with the shapes
#     of the full run (its last partial batch, the whole test pass, flip test-time augmentation)
#     so that CubeCL's persistent autotune cache holds every kernel stage 2 needs.
#   unpack DIR (carry DIR): more of CIFAR-10 (.device/call2: batches 2-4), nothing else.
#   stage 2 [DIR] (carry DIR, default .device/call3: batch 5 and the test batch): the rest of
#     CIFAR-10, all of it checked against CIFAR10-SHA256SUMS; the integration tests' check of
#     long reductions (`long_reductions_keep_every_value`, README.md "Known issues": wrong on
#     Mesa 22.3.6's lavapipe) on the GPU, into reductions.log; waits for the probes; ResNet-18
#     trained on the full set with the fastest choice for as many epochs as fit at its speed in
#     $TRAIN_SECONDS, or, given LEASE_SECONDS (the device time left when the call was made), in
#     what the lease has left less $RESERVE_SECONDS for stage torch, and in the call's 600 s;
#     evaluated every $EVAL_EVERY epochs (default 1) and after the last, then once more with
#     flip test-time augmentation (--eval-flip; EVAL_FLIP=0 skips it).
#   torch: PyTorch's training images/s for the same model and batch on the same GPU: fp32, AMP
#     f16 when Burn trained with f16 convolutions, TF32 with TF32=1; then the probes' logs and
#     the caches the machine now holds (CubeCL's autotune results, NVIDIA's shader cache) into
#     $OUT, to be put into .device/cache for the next lease.
#
# The candidates: Burn's wgpu backend with its own convolutions in f32 (known: 1,210 images/s
# at batch 256 on the H200, first lease of 2026-11-28), resnet-burn's im2col convolutions
# (resnet_burn::GpuConv), and f16 convolutions (resnet_burn::GpuPrecision) on wgpu pinned to
# Vulkan, whose SPIR-V compiler gives CubeCL's matrix kernels the GPU's tensor cores
# (cooperative matrices), which f32 does not get. The second lease (BENCHMARKS.md) ranked them:
# Vulkan with Burn's convolutions in f16 trained at 6,338 images/s, im2col in f16 probed at 616,
# im2col in f32 crashed. So the default probe is that one alone; where it leaves no speed (stopped
# or out of time) its known one ($KNOWN) stands, where it fails (a crash, an error) it is out. CHOICE=BACKEND:CONV:PRECISION makes stage 2 train with that
# one regardless of the probes.
#
# The plan that fits 15 minutes, after `bash scripts/gpu_session.sh prepare` here (below), each
# call made as soon as the last returns (timeout_s: what the call may take; stage 2 keeps inside
# 600 s by itself):
#   1. bash scripts/gpu_session.sh 1                    carry .gl .device/call1 [.device/cache]   120
#   2. bash scripts/gpu_session.sh unpack .device/call2 carry .device/call2                        120
#   3. LEASE_SECONDS=<budget_left_s> EVAL_EVERY=2 bash scripts/gpu_session.sh 2  carry .device/call3  600
#   4. bash scripts/gpu_session.sh torch                                                     240
# then give_back. Put the cache-*.tar.xz of call 4 into .device/cache for the next lease (an
# ignored folder: it lasts as long as this checkout, and a fresh machine starts without it).
# Only cache-cubecl.tar.xz fits (82 KB on 2026-11-29): cache-home.tar.xz, NVIDIA's shader
# cache (10.5 MB), takes call 1 over 64 MiB beside the binaries, which prepare refuses.
#
# What the calls carry is made here (x86-64 like the GPU machine), before the lease, by
#   bash scripts/gpu_session.sh prepare
# which keeps what is already there and up to date: .gl (the Vulkan and GL loaders the GPU
# machine lacks, Debian's amd64 packages), CIFAR-10 packed by scripts/cifar10_pack.py into
# .device/call1-3 (from CIFAR10_DIR, default ../shared/data/cifar-10-batches-bin), and the
# binaries built from HEAD (.device/BUILT_FROM) into .device/call1/bin/bins.tar.xz: two builds
# of the example, because with the `vulkan` feature CubeCL compiles SPIR-V for every Vulkan
# adapter, `--backend wgpu` included, and that path is unproven (it crashes inside lavapipe,
# Mesa 22.3.6, here), and the criterion benches; stripped and xz-compressed (35.3 MB from
# a56192e, 35.4 MB from 6b97591, 4f99993, 314f909 and c85e7f8). The integration tests, built
# with `vulkan`, go into .device/call3/bin/it.tar.xz (20.0 MB from c85e7f8). Measured on a
# fresh 2-core machine whose target folder held only the tests' release build (CI's cache):
# 39 min, 31 of them for the vulkan build, 7.6 for the rest, nearly all xz; after a change to
# crates/resnet-burn alone, 8 min 43 s (6b97591), 6 min 56 s (4f99993) and 9 min 13 s
# (314f909), and with the integration tests too 11 min 23 s (c85e7f8), 10 min 48 s after a
# change to tests/ alone (e2c9430), 11 min 56 s after changes to crates/resnet-burn
# (a9a4ac6) and 11 min 1 s (fa4d7ba). The three calls then carried 56.6, 55.1 and 57.9 MB.
# CARGO_TARGET_DIR must be the folder the tests were built in: without it, cargo builds from
# nothing into ./target (a run killed after 30 minutes, still in the vulkan build, 2026-11-29).
set -uo pipefail
stage=${1:?usage: gpu_session.sh prepare | 1 | probes | unpack DIR | 2 [DIR] | torch}

if [ "$stage" = prepare ]; then
    # Each call carries at most 64 MiB with the working tree (git's files, ignored ones aside);
    # call 1 also carries .gl and .device/cache.
    limit=$((64 * 1024 * 1024))
    data=${CIFAR10_DIR:-../shared/data/cifar-10-batches-bin}
    [ -d "$data" ] || { echo "no $data: set CIFAR10_DIR to CIFAR-10's cifar-10-batches-bin folder"; exit 1; }
    sums=${CIFAR10_SUMS:-$(dirname "$data")/CIFAR10-SHA256SUMS}
    [ -f "$sums" ] || { echo "no $sums: set CIFAR10_SUMS to CIFAR-10's SHA-256 sums"; exit 1; }
    if ! compgen -G ".gl/*.deb" > /dev/null; then
        mkdir -p .gl /tmp/amd64/partial
        o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
        apt-get $o update -qq && (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 \
            libopengl0 libgl1 libglx0 libgles2) || { echo "could not download the loaders into .gl"; exit 1; }
    fi
    python3 -c "import numpy" 2> /dev/null || { echo "scripts/cifar10_pack.py needs numpy: pip install numpy"; exit 1; }
    # Batch 1 travels with the binaries, 2-4 in call 2, 5 and the test batch in call 3.
    for call in 1:data_batch_1 2:data_batch_2,data_batch_3,data_batch_4 3:data_batch_5,test_batch; do
        dir=.device/call${call%%:*}
        IFS=, read -ra names <<< "${call#*:}"
        missing=()
        for f in "${names[@]}"; do [ -f "$dir/pk/$f.bin.pk" ] || missing+=("$f.bin"); done
        if [ ${#missing[@]} -gt 0 ]; then
            python3 scripts/cifar10_pack.py pack "$data" "$dir/pk" --files "$(IFS=,; echo "${missing[*]}")" || exit 1
        fi
    done
    install -m 644 "$sums" .device/call1/CIFAR10-SHA256SUMS
    head=$(git rev-parse HEAD)
    # The binaries are named by the commit they are built from: its sources, uncommitted
    # changes none. They are built again where HEAD's sources differ from that commit's (not
    # for a change of scripts or docs, or of the results kept in benches/results).
    sources="Cargo.toml Cargo.lock crates src examples benches tests :!benches/results"
    git diff --quiet HEAD -- $sources || { echo "commit the changes to $sources first"; exit 1; }
    built=$(cat .device/BUILT_FROM 2>/dev/null)
    if [ ! -f .device/call1/bin/bins.tar.xz ] || [ ! -f .device/call3/bin/it.tar.xz ] || [ -z "$built" ] ||
        ! git diff --quiet "$built" HEAD -- $sources 2> /dev/null; then
        rm -rf .device/build && mkdir -p .device/build .device/call1/bin .device/call3/bin
        # The executable a cargo command builds (from its JSON messages), copied and stripped
        # at once, before the next build can link over it.
        build() {
            local name=$1 out=$2; shift 2
            cargo "$@" --message-format=json-render-diagnostics |
                python3 -c 'import json, sys
exe = [m["executable"] for m in map(json.loads, sys.stdin)
       if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]]
print(exe[-1] if exe else "")' "$name" > .device/build/exe || return 1
            [ -s .device/build/exe ] || { echo "cargo $* built no $name"; return 1; }
            strip -o ".device/build/$out" "$(cat .device/build/exe)" || return 1
            echo "$out: $(stat -c %s ".device/build/$out") bytes, from $(cat .device/build/exe)"
        }
        build cifar10 cifar10-vulkan.stripped build --release --example cifar10 --features vulkan &&
            build cifar10 cifar10.stripped build --release --example cifar10 &&
            build resnet resnet-bench.stripped bench --bench resnet --no-run &&
            build it it-vulkan.stripped test --release --test it --features vulkan --no-run || exit 1
        # Two builds of one example: the feature must have made them differ.
        cmp -s .device/build/cifar10-vulkan.stripped .device/build/cifar10.stripped &&
            { echo "the vulkan and default builds of the example are the same file"; exit 1; }
        (cd .device/build && tar cf - cifar10-vulkan.stripped cifar10.stripped resnet-bench.stripped) |
            xz --x86 --lzma2=preset=9e,dict=192MiB > .device/call1/bin/bins.tar.xz.part || exit 1
        mv .device/call1/bin/bins.tar.xz.part .device/call1/bin/bins.tar.xz
        # The integration tests travel in call 3, which has the room.
        (cd .device/build && tar cf - it-vulkan.stripped) |
            xz --x86 --lzma2=preset=9e,dict=192MiB > .device/call3/bin/it.tar.xz.part || exit 1
        mv .device/call3/bin/it.tar.xz.part .device/call3/bin/it.tar.xz
        echo "$head" > .device/BUILT_FROM
        rm -rf .device/build
    fi
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- | tail -1 | cut -f1)
    for call in 1 2 3; do
        paths=.device/call$call
        [ $call = 1 ] && paths="$paths .gl $(ls -d .device/cache 2>/dev/null)"
        bytes=$(($(du -cb $paths | tail -1 | cut -f1) + tree))
        echo "call $call carries $paths and the working tree: $bytes bytes"
        [ "$bytes" -lt "$limit" ] || { echo "call $call is over 64 MiB"; exit 1; }
    done
    echo "ready: binaries built from $(cat .device/BUILT_FROM), whose sources HEAD ($head) has"
    exit 0
fi
OUT=${OUT:-/tmp/gpu-out}
WORK=${WORK:-/root/gpu}
BATCH=${BATCH:-256}
LR=${LR:-0.2}
EXTRA=${EXTRA:-}            # extra flags for the example (a local dry run uses --base-channels 8)
BACKEND=${BACKEND:-wgpu}   # of the benches
PROBES=${PROBES:-vulkan:burn:f16}
# Measured speeds (images/s at batch 256 on the H200, 2026-11-28), standing where a probe
# leaves none.
KNOWN=${KNOWN-wgpu:burn:f32=1210 vulkan:burn:f16=6338}
mkdir -p "$OUT" "$WORK/bin" "$WORK/cifar"
export XDG_RUNTIME_DIR=/tmp RUST_BACKTRACE=1 PYTHONUNBUFFERED=1
# The example built for BACKEND: with the `vulkan` feature for vulkan, without it otherwise.
bin_for() { if [ "$1" = vulkan ]; then echo "$WORK/bin/cifar10-vulkan.stripped"; else echo "$WORK/bin/cifar10.stripped"; fi; }
t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0))s] $*"; }
# The binaries of the xz-compressed tar $1 into $WORK/bin.
unpack_bins() {
    python3 -c "import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])" \
        "$1" "$WORK/bin"
}
# The packed batches of folder $1 into $WORK/cifar, each checked against CIFAR10-SHA256SUMS.
unpack_data() {
    python3 scripts/cifar10_pack.py unpack "$1/pk" "$WORK/cifar" --sums "$WORK/CIFAR10-SHA256SUMS" || exit 1
    ls "$WORK/cifar"
    stamp "unpacked $1"
}
# The caches a run leaves: CubeCL's autotune results (in `target/environment` under the
# outermost Cargo.toml above the working directory, its default), relative to the checkout, and
# the NVIDIA driver's compiled shaders, relative to $HOME.
cache_dir() { if [ "$1" = cubecl ]; then pwd; else echo "$HOME"; fi; }
cache_paths() { if [ "$1" = cubecl ]; then echo target/environment; else echo .cache/nvidia .nv; fi; }

if [ "$stage" = 1 ]; then
    if command -v nvidia-smi >/dev/null; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
    fi
    unpack_bins .device/call1/bin/bins.tar.xz || exit 1
    cp .device/call1/CIFAR10-SHA256SUMS "$WORK/"
    unpack_data .device/call1
    for c in cubecl home; do
        f=.device/cache/cache-$c.tar.xz
        [ -f "$f" ] && tar -C "$(cache_dir $c)" -xJf "$f" && stamp "restored $f"
    done

    # Criterion on wgpu and PyTorch on CUDA, same cases as on the CPU.
    if [ "${BENCHES:-0}" = 1 ]; then
        BENCH_BACKENDS=$BACKEND CRITERION_HOME=$WORK/criterion timeout 300 python3 benches/compare.py \
            --backends "$BACKEND" --torch-device "${TORCH_DEVICE:-cuda}" \
            --bench-binary "$WORK/bin/resnet-bench.stripped" --markdown "$OUT/bench-gpu.md" 2>&1 |
            grep -v "^Benchmarking\|^Found\|^  [0-9]* (\|^$" | tee "$OUT/bench.log"
        stamp "benches done"
    fi

    rm -f "$WORK/probes.done"
    if [ "${PROBES_BG:-1}" = 1 ]; then
        setsid bash "$0" probes > "$WORK/probes.log" 2>&1 < /dev/null &
        stamp "probes started in the background (pid $!): $PROBES"
        exit 0
    fi
    bash "$0" probes 2>&1 | tee "$WORK/probes.log"
    cp "$WORK/probes.txt" "$OUT/"

    [ "${PROFILE:-0}" = 1 ] || { stamp "stage 1 done"; exit 0; }
    # Ten steps of the fastest with CubeCL's profiler: one line per kernel with its duration.
    IFS=: read -r backend conv precision <<< "$(sort -k2 -g -r "$WORK/probes.txt" | awk 'NR == 1 { print $1 }')"
    P=$WORK/probe-data
    mkdir -p .gpu-profile
    printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\n' "$OUT/kernels.log" > .gpu-profile/cubecl.toml
    (cd .gpu-profile && timeout --foreground -k 10 -s INT 60 "$(bin_for "$backend")" --backend "$backend" --gpu-conv "$conv" \
        --precision "$precision" --data-dir "$P" --epochs 1 --batch-size "$BATCH" \
        --limit-train $((BATCH * 10)) --limit-test 500 --no-progress $EXTRA \
        --artifact-dir "$WORK/profile-run") > "$OUT/profile.log" 2>&1
    tail -3 "$OUT/profile.log"
    ls -la "$OUT"
    stamp "stage 1 done"
    exit 0
fi

if [ "$stage" = probes ]; then
    # On batch 1 as all five training batches and as the test set: speed only, their accuracy
    # means nothing. The training set is 20 full batches and the remainder the full set leaves
    # (50,000 mod BATCH), the test set is 10,000 images as the real one, so that the caches they
    # leave (kept while the machine is warm) hold every shape of stage 2.
    P=$WORK/probe-data
    mkdir -p "$P"
    for f in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch; do
        ln -sf "$WORK/cifar/data_batch_1.bin" "$P/$f.bin"
    done
    : > "$WORK/probes.txt"
    for probe in $PROBES; do
        IFS=: read -r backend conv precision <<< "$probe"
        name=$backend-$conv-$precision
        timeout --foreground -k 10 -s INT "${PROBE_SECONDS:-420}" "$(bin_for "$backend")" --backend "$backend" --gpu-conv "$conv" \
            --precision "$precision" --data-dir "$P" --epochs 2 --batch-size "$BATCH" \
            --limit-train $((BATCH * ${PROBE_STEPS:-20} + 50000 % BATCH)) --limit-test 10000 --eval-flip \
            --no-progress $EXTRA --artifact-dir "$WORK/probe-$name" > "$WORK/probe-$name.log" 2>&1
        rc=$?
        ips=$(awk -F, 'NR == 3 { print $8 }' "$WORK/probe-$name/metrics.csv" 2>/dev/null)
        if [ -n "$ips" ]; then
            echo "$probe $ips" >> "$WORK/probes.txt"
            stamp "probe $probe: $ips images/s"
        elif [ "$rc" = 0 ] || [ "$rc" = 124 ]; then
            stamp "probe $probe: no speed (stopped or out of time)"
        else
            # It crashed or failed (a driver fault, an allocation the GPU refused): not a
            # candidate, whatever its known speed.
            echo "$probe failed" >> "$WORK/probes.txt"
            stamp "probe $probe: failed (exit status $rc)"
        fi
    done
    touch "$WORK/probes.done"
    exit 0
fi

if [ "$stage" = unpack ]; then
    unpack_data "${2:?unpack DIR}"
    tail -2 "$WORK/probes.log" 2>/dev/null
    exit 0
fi

if [ "$stage" = torch ]; then
    # PyTorch, same model, batch and recipe, same GPU: strict fp32 (as Burn's f32), PyTorch's
    # automatic mixed precision in f16 when Burn trained with f16 convolutions, TF32 (TF32=1).
    precision=$(cat "$WORK/precision" 2>/dev/null || echo f16)
    modes=fp32
    [ "$precision" = f16 ] && modes="$modes amp-f16"
    [ "${TF32:-0}" = 1 ] && modes="$modes tf32"
    if [ "${TORCH_DEVICE:-cuda}" = cuda ]; then
        for mode in $modes; do
            flag=""
            [ "$mode" = tf32 ] && flag=--tf32
            [ "$mode" = amp-f16 ] && flag=--amp-f16
            python3 scripts/cifar10_pytorch.py --device cuda --data-dir "$WORK/cifar" --epochs 2 \
                --batch-size "$BATCH" --lr "$LR" --limit-train 25600 --limit-test 2000 \
                --json "$OUT/pytorch-$mode.json" $flag 2>&1 | tee -a "$OUT/pytorch.log"
            stamp "pytorch $mode done"
        done
        # ResNet-50's bench cases in PyTorch (R50=1), missing from 2026-11-28 (the benches' step
        # ran out of time before them); Burn's are in BENCHMARKS.md.
        if [ "${R50:-0}" = 1 ]; then
            timeout 120 python3 benches/pytorch_reference.py --device cuda --cases resnet50_224 \
                --json "$OUT/pytorch-resnet50.json" 2>&1 | tee -a "$OUT/pytorch.log"
        fi
    fi
    # The probes' logs in one file, and the caches for the next lease (each file at most 16 MiB
    # comes back).
    (cd "$WORK" && tar cf - probes.log probes.txt probe-*.log probe-*/metrics.csv 2>/dev/null) | xz -6 > "$OUT/probes.tar.xz"
    for c in cubecl home; do
        paths=$(cd "$(cache_dir $c)" && for p in $(cache_paths $c); do [ -e "$p" ] && echo "$p"; done)
        [ -n "$paths" ] && tar -C "$(cache_dir $c)" -cf - $paths | xz -T0 -6 > "$OUT/cache-$c.tar.xz"
    done
    ls -la "$OUT"
    stamp "torch done"
    exit 0
fi

# Stage 2.
unpack_data "${2:-.device/call3}"
for f in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch; do
    [ -f "$WORK/cifar/$f.bin" ] || { echo "$f.bin has not arrived: run the unpack calls first"; exit 1; }
done
# Whether this GPU's Vulkan driver reduces long rows right (Mesa 22.3.6's lavapipe does not;
# BatchNorm's statistics at batch 256 are such reductions): flex, ndarray, then the GPU.
it_archive=${2:-.device/call3}/bin/it.tar.xz
if [ -f "$it_archive" ]; then
    unpack_bins "$it_archive" &&
        timeout 60 "$WORK/bin/it-vulkan.stripped" --ignored --exact training::long_reductions_keep_every_value \
            > "$OUT/reductions.log" 2>&1
    stamp "long reductions on this GPU: exit $? ($(grep -m1 -o 'test result: [a-zA-Z]*' "$OUT/reductions.log"))"
fi
# The lease's end and the call's: both counted from this call's start.
lease=${LEASE_SECONDS:-100000}
call_end=${CALL_SECONDS:-600}
reserve=${RESERVE_SECONDS:-150}
# Seconds left to train: of the lease less the reserve, and of the call less 40 s (SIGINT's
# grace and copying back).
train_left() {
    local elapsed=$(($(date +%s) - t0))
    local a=$((lease - reserve - elapsed)) b=$((call_end - 40 - elapsed))
    echo $((a < b ? a : b))
}
# The probes: wait for them while at least MIN_TRAIN_SECONDS would be left to train, then stop
# them: the loop, so that it starts no other probe, and the example with one SIGINT, as Ctrl-C
# (it stops at the next step).
while [ ! -f "$WORK/probes.done" ] && pgrep -f "gpu_session.sh probes" > /dev/null; do
    if [ "$(train_left)" -lt "${MIN_TRAIN_SECONDS:-240}" ]; then
        stamp "stopping the probes to leave time for training"
        pkill -TERM -f "gpu_session.sh probes"
        pkill -INT -f "^$WORK/bin/"
        sleep 15
        break
    fi
    sleep 5
done
stamp "probes: $(tail -1 "$WORK/probes.log" 2>/dev/null)"

# The choice: CHOICE, else the fastest of the probes and the known speeds (a probe's measured
# speed replaces the known one of the same candidate; a probe that failed removes it).
{ for k in $KNOWN; do echo "${k%=*} ${k#*=} known"; done; cat "$WORK/probes.txt" 2>/dev/null; } |
    awk '$2 == "failed" { failed[$1] = 1; next }
         { speed[$1] = $2; how[$1] = ($3 == "" ? "probed" : $3) }
         END { for (c in speed) if (!(c in failed)) print c, speed[c], how[c] }' |
    sort -k2 -g -r | tee "$OUT/probes-ranked.txt"
choice=${CHOICE:-$(awk 'NR == 1 { print $1 }' "$OUT/probes-ranked.txt")}
choice=${choice:-wgpu:burn:f32}
ips=$(awk -v c="$choice" '$1 == c { print $2 }' "$OUT/probes-ranked.txt")
ips=${ips:-1210}
IFS=: read -r backend conv precision <<< "$choice"
echo "$precision" > "$WORK/precision"

# As many epochs as fit: at the probe's speed, a test pass every EVAL_EVERY epochs (on the H200
# in f16 it took 0.6 s for 10,000 images; reckoned here at 1.2x the training speed), 40 s for the
# start and the final save (the first step took 8.2 s with warm caches, the first epoch 10 s more
# than the others), and with EVAL_FLIP (default 1) one more pass of two forwards per test image.
# The limit: TRAIN_SECONDS, else train_left (RESERVE_SECONDS is for stage torch and the
# transfers).
budget=${TRAIN_SECONDS:-$(train_left)}
every=${EVAL_EVERY:-1}
flip=${EVAL_FLIP:-1}
epochs=${EPOCHS:-$(awk -v ips="$ips" -v budget="$budget" -v every="$every" -v flip="$flip" 'BEGIN {
    test = 10000 / (1.2 * ips); epoch = 50000 / ips + test / every
    e = int((budget - 40 - 2 * flip * test) / epoch)
    print (e < 1 ? 1 : e) }')}
stamp "training with $choice: $epochs epochs in at most ${budget}s (expecting $ips images/s)"
timeout --foreground -k 20 -s INT "$budget" "$(bin_for "$backend")" --backend "$backend" --gpu-conv "$conv" --precision "$precision" \
    --data-dir "$WORK/cifar" --epochs "$epochs" --batch-size "$BATCH" --lr "$LR" \
    --eval-every "$every" $([ "$flip" = 1 ] && echo --eval-flip) \
    --no-progress $EXTRA --artifact-dir "$WORK/run" 2>&1 | tee "$OUT/train.log"
for f in metrics.csv summary.json config.json curves.png; do
    [ -f "$WORK/run/$f" ] && cp "$WORK/run/$f" "$OUT/"
done
ls -la "$OUT"
stamp "stage 2 done"
