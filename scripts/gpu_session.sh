#!/usr/bin/env bash
# The GPU checks of issues 5 and 6, as three calls of the device tool (see ../shared/GPU.md and
# the tool's README): the session has 15 minutes of device time and each call carries 64 MiB,
# so the binaries are built here (25.4 MB compressed) and CIFAR-10 travels packed
# (scripts/cifar10_pack.py) in three pieces, .device/call1, call2 and call3 (ignored folders,
# carried). What a call unpacks stays in $WORK while the machine is warm (30 s between calls).
#
#   stage 1 (carry .gl .device/call1): GPU, binaries, batches 1 and 2; criterion benches on
#     wgpu against PyTorch on CUDA (benches/compare.py; BENCHES=0 skips them: on 2026-11-28
#     they ran into their 200 s limit before PyTorch's ResNet-50 cases); a training probe
#     (time to the first step with a cold autotune cache, steady images/s); ten steps with
#     CubeCL's kernel profiler (PROFILE=0 skips them).
#   unpack DIR (carry DIR): more of CIFAR-10 (.device/call2: batches 3-5), nothing else.
#   stage 2 [DIR] (carry DIR, default .device/call3: the test batch): the rest of CIFAR-10,
#     all of it checked against CIFAR10-SHA256SUMS; PyTorch's training images/s for the
#     same model and batch (fp32 and TF32) and its ResNet-50 bench cases; ResNet-18 trained
#     on the full set for as many epochs as fit in $TRAIN_SECONDS at the probe's speed,
#     evaluated every $EVAL_EVERY epochs (default 1) and after the last, then once more with
#     flip test-time augmentation (--eval-flip; EVAL_FLIP=0 skips it).
#
# RESNET_BURN_GPU_CONV=im2col in the environment makes the benches and the example use
# resnet-burn's im2col convolutions (resnet_burn::GpuConv) instead of Burn's. Stage 2 without
# it trains with stage 1's choice, unless that was im2col and its probe was slower than Burn's
# convolutions ($BURN_IPS, default 1210: images/s at batch 256 on the H200 on 2026-11-28).
#
# Building what stage 1 carries (here, x86-64 like the GPU machine):
#   cargo build --release --example cifar10 && cargo bench --bench resnet --no-run
#   strip, then: tar cf - cifar10.stripped resnet-bench.stripped |
#     xz --x86 --lzma2=preset=9e,dict=192MiB > .device/call1/bin/bins.tar.xz
#   python3 scripts/cifar10_pack.py pack ../shared/data/cifar-10-batches-bin DIR [--split 2]
set -uo pipefail
stage=${1:?usage: gpu_session.sh 1 | unpack DIR | 2 [DIR]}
OUT=${OUT:-/tmp/gpu-out}
WORK=${WORK:-/root/gpu}
BATCH=${BATCH:-256}
LR=${LR:-0.2}
EXTRA=${EXTRA:-}            # extra flags for the example (a local dry run uses --base-channels 8)
BACKEND=${BACKEND:-wgpu}
mkdir -p "$OUT" "$WORK/bin" "$WORK/cifar"
export XDG_RUNTIME_DIR=/tmp RUST_BACKTRACE=1 PYTHONUNBUFFERED=1
BIN=$WORK/bin/cifar10.stripped
t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0))s] $*"; }
# The packed batches of folder $1 into $WORK/cifar, each checked against CIFAR10-SHA256SUMS.
unpack_data() {
    python3 scripts/cifar10_pack.py unpack "$1/pk" "$WORK/cifar" --sums "$WORK/CIFAR10-SHA256SUMS" || exit 1
    ls "$WORK/cifar"
    stamp "unpacked $1"
}

if [ "$stage" = 1 ]; then
    if command -v nvidia-smi >/dev/null; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
    fi
    python3 -c "import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])" \
        .device/call1/bin/bins.tar.xz "$WORK/bin" || exit 1
    cp .device/call1/CIFAR10-SHA256SUMS "$WORK/"
    unpack_data .device/call1

    # Criterion on wgpu and PyTorch on CUDA, same cases as on the CPU.
    if [ "${BENCHES:-1}" = 1 ]; then
        BENCH_BACKENDS=$BACKEND CRITERION_HOME=$WORK/criterion timeout 300 python3 benches/compare.py \
            --backends "$BACKEND" --torch-device "${TORCH_DEVICE:-cuda}" \
            --bench-binary "$WORK/bin/resnet-bench.stripped" --markdown "$OUT/bench-gpu.md" 2>&1 |
            grep -v "^Benchmarking\|^Found\|^  [0-9]* (\|^$" | tee "$OUT/bench.log"
        stamp "benches done"
    fi

    # Training probe on the batches that are here (1, 2, 2 again as 3-5 and as the test set:
    # speed only, its accuracy means nothing): time to the first step with a cold autotune
    # cache, then steady images/s in the second epoch. The CubeCL cache it leaves (autotune
    # results in target/environment, kept while the machine is warm) serves the profile and
    # stage 2.
    P=$WORK/probe-data
    mkdir -p "$P"
    for i in 1 2 3 4 5; do ln -sf "$WORK/cifar/data_batch_$(( (i - 1) % 2 + 1 )).bin" "$P/data_batch_$i.bin"; done
    ln -sf "$WORK/cifar/data_batch_2.bin" "$P/test_batch.bin"
    timeout -k 10 -s INT 150 "$BIN" --backend "$BACKEND" --data-dir "$P" --epochs 2 --batch-size "$BATCH" \
        --limit-train $((BATCH * ${PROBE_STEPS:-60})) --limit-test 2000 --no-progress $EXTRA \
        --artifact-dir "$WORK/probe-run" 2>&1 | tee "$OUT/probe.log"
    cp "$WORK/probe-run/metrics.csv" "$OUT/probe-metrics.csv"
    echo "${RESNET_BURN_GPU_CONV:-burn}" > "$WORK/probe-conv"
    stamp "probe done"

    [ "${PROFILE:-1}" = 1 ] || { stamp "stage 1 done"; exit 0; }
    # Ten steps with CubeCL's profiler: one line per kernel with its duration.
    mkdir -p .gpu-profile
    printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\n' "$OUT/kernels.log" > .gpu-profile/cubecl.toml
    (cd .gpu-profile && timeout -k 10 -s INT 60 "$BIN" --backend "$BACKEND" --data-dir "$P" --epochs 1 \
        --batch-size "$BATCH" --limit-train $((BATCH * 10)) --limit-test 500 --no-progress $EXTRA \
        --artifact-dir "$WORK/profile-run") > "$OUT/profile.log" 2>&1
    tail -3 "$OUT/profile.log"
    ls -la "$OUT"
    stamp "stage 1 done"
    exit 0
fi

if [ "$stage" = unpack ]; then
    unpack_data "${2:?unpack DIR}"
    exit 0
fi

# Stage 2.
unpack_data "${2:-.device/call3}"
for f in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch; do
    [ -f "$WORK/cifar/$f.bin" ] || { echo "$f.bin has not arrived: run the unpack calls first"; exit 1; }
done

# PyTorch, same model, batch and recipe, same GPU: strict fp32 (as Burn), then TF32.
if [ "${TORCH_DEVICE:-cuda}" = cuda ]; then
    for mode in fp32 tf32; do
        python3 scripts/cifar10_pytorch.py --device cuda --data-dir "$WORK/cifar" --epochs 2 \
            --batch-size "$BATCH" --lr "$LR" --limit-train 25600 --limit-test 2000 \
            --json "$OUT/pytorch-$mode.json" $([ $mode = tf32 ] && echo --tf32) 2>&1 | tee -a "$OUT/pytorch.log"
    done
    # ResNet-50's bench cases in PyTorch, missing from 2026-11-28 (the benches' step ran out of
    # time before them); Burn's are in BENCHMARKS.md.
    timeout 120 python3 benches/pytorch_reference.py --device cuda --cases resnet50_224 \
        --json "$OUT/pytorch-resnet50.json" 2>&1 | tee -a "$OUT/pytorch.log"
    stamp "pytorch done"
fi

# As many epochs as fit: the probe's speed, a test pass every EVAL_EVERY epochs (on the H200 on
# 2026-11-28 it ran at about 1.3x the training speed: 6.5 s for 10,000 images) and 40 s for the
# start (26 s to the first step on 2026-11-28, in a later process of the same machine) and the
# final save; with EVAL_FLIP (default 1) one more pass of two forwards per test image.
budget=${TRAIN_SECONDS:-400}
every=${EVAL_EVERY:-1}
flip=${EVAL_FLIP:-1}
probe_conv=$(cat "$WORK/probe-conv" 2>/dev/null || echo burn)
burn_ips=${BURN_IPS:-1210}
conv=${RESNET_BURN_GPU_CONV:-$probe_conv}
ips=$(awk -F, 'NR > 1 { v = $8 } END { print v }' "$WORK/probe-run/metrics.csv" 2>/dev/null)
if [ -z "$ips" ]; then
    # A probe that failed says nothing for its convolution: Burn's, unless one was asked for.
    echo "no speed from stage 1's probe ($WORK/probe-run/metrics.csv): assuming Burn's $burn_ips images/s"
    ips=$burn_ips
    [ -z "${RESNET_BURN_GPU_CONV:-}" ] && conv=burn
elif [ -z "${RESNET_BURN_GPU_CONV:-}" ] && [ "$probe_conv" = im2col ] &&
    awk -v a="$ips" -v b="$burn_ips" 'BEGIN { exit !(a < b) }'; then
    echo "stage 1's probe ran im2col at $ips images/s, under Burn's $burn_ips: training with Burn's"
    conv=burn
fi
[ "$conv" = burn ] && [ "$probe_conv" != burn ] && ips=$burn_ips
export RESNET_BURN_GPU_CONV=$conv
stamp "convolutions: $conv"
epochs=${EPOCHS:-$(awk -v ips="$ips" -v budget="$budget" -v every="$every" -v flip="$flip" 'BEGIN {
    test = 10000 / (1.2 * ips); epoch = 50000 / ips + test / every
    e = int((budget - 40 - 2 * flip * test) / epoch)
    print (e < 1 ? 1 : e) }')}
stamp "training $epochs epochs in at most ${budget}s (expecting $ips images/s)"
timeout -k 20 -s INT "$budget" "$BIN" --backend "$BACKEND" --data-dir "$WORK/cifar" --epochs "$epochs" \
    --batch-size "$BATCH" --lr "$LR" --eval-every "$every" $([ "$flip" = 1 ] && echo --eval-flip) \
    --no-progress $EXTRA --artifact-dir "$WORK/run" 2>&1 | tee "$OUT/train.log"
for f in metrics.csv summary.json config.json curves.png; do
    [ -f "$WORK/run/$f" ] && cp "$WORK/run/$f" "$OUT/"
done
ls -la "$OUT"
stamp "stage 2 done"
