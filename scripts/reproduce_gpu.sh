#!/usr/bin/env bash
# Reproduces BENCHMARKS.md's GPU figures on a Linux machine with a GPU and its Vulkan driver:
# builds the CIFAR-10 example for Vulkan (SPIR-V), checks long reductions on the GPU, measures
# the time to the first training step with empty kernel caches, trains ResNet-18 on CIFAR-10
# with the recipe of the 94% run, and runs the same recipe in PyTorch (fp32 and AMP f16) on the
# same GPU. About ten minutes on an H200 after the build.
#
#   bash scripts/reproduce_gpu.sh DATA_DIR [OUT_DIR]
#
# DATA_DIR: CIFAR-10's binary files (cifar-10-batches-bin). OUT_DIR (default
# results-gpu): where the outputs go, one file per measurement, in the shape of
# benches/results/h200-vulkan-f16/. Needs cargo, and python3 with a CUDA build of torch and
# torchvision for the PyTorch rows (skipped with a message without them). EPOCHS (default 40)
# sets the length of the training run.
set -euo pipefail
cd "$(dirname "$0")/.."

data=$(cd "${1:?usage: reproduce_gpu.sh DATA_DIR [OUT_DIR]}" && pwd)
out=$(mkdir -p "${2:-results-gpu}" && cd "${2:-results-gpu}" && pwd)
epochs=${EPOCHS:-40}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}

echo "== build (cargo build --release --features vulkan --example cifar10)"
cargo build --release --features vulkan --example cifar10
bin=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/cifar10

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv | tee "$out/gpu.txt"
fi

echo "== long reductions on the GPU's Vulkan driver"
cargo test --release --features vulkan --test it -- --ignored --exact \
    training::long_reductions_keep_every_value 2>&1 | tee "$out/reductions.log"

echo "== the first training step with empty caches (CubeCL's autotune store, the driver's)"
cold=$(mktemp -d)
touch "$cold/Cargo.toml" # CubeCL keeps its store in target/environment/ beside the outermost one
(cd "$cold" && XDG_CACHE_HOME="$cold/cache" "$bin" --backend vulkan --precision f16 \
    --data-dir "$data" --batch-size 256 --lr 0.2 --epochs 1 --limit-train 25600 \
    --limit-test 1000 --no-progress --artifact-dir "$cold/run") 2>&1 | tee "$out/first-step.log"
rm -rf "$cold"

echo "== training: $epochs epochs, batch 256, f16 convolutions on Vulkan"
"$bin" --backend vulkan --precision f16 --data-dir "$data" --batch-size 256 --lr 0.2 \
    --epochs "$epochs" --eval-every 2 --eval-flip --no-progress --artifact-dir "$out/run" \
    2>&1 | tee "$out/train.log"
cp "$out/run/"{config.json,metrics.csv,summary.json,curves.png} "$out/"

echo "== PyTorch: the same recipe, two epochs of 25,600 images, fp32 and AMP f16"
if python3 -c 'import torch, torchvision; assert torch.cuda.is_available()' 2>/dev/null; then
    for mode in fp32 amp-f16; do
        flag=$([ "$mode" = amp-f16 ] && echo --amp-f16 || true)
        python3 scripts/cifar10_pytorch.py --device cuda --data-dir "$data" --epochs 2 \
            --batch-size 256 --lr 0.2 --limit-train 25600 --limit-test 2000 $flag \
            --json "$out/pytorch-$mode.json" 2>&1 | tee -a "$out/pytorch.log"
    done
else
    echo "skipped: python3 has no CUDA build of torch and torchvision" | tee "$out/pytorch.log"
fi
echo "== done: $out"
