#!/usr/bin/env bash
# Measures BENCHMARKS.md's data-parallel figures on one machine: the CIFAR-10 example on
# ResNet-18 (flex) as one process with every core, as one process with one thread, and as
# PROCESSES processes under mpirun with one thread each, the same global batch and recipe
# otherwise. Prints each run's training images/s, test accuracy and the all-reduce's share of
# process 0's training time, from the runs' summary.json.
#
#   bash scripts/mpi_scaling.sh DATA_DIR [OUT_DIR]
#
# DATA_DIR: CIFAR-10's binary files (cifar-10-batches-bin). OUT_DIR (default results-mpi): the
# runs' artifact folders and logs. Needs Open MPI (openmpi-bin, libopenmpi-dev) and libclang
# to build. ARGS (default: 2,048 training images, 2 epochs, the full test set once) and
# PROCESSES (default 2) change the runs.
set -euo pipefail
cd "$(dirname "$0")/.."

data=$(cd "${1:?usage: mpi_scaling.sh DATA_DIR [OUT_DIR]}" && pwd)
out=$(mkdir -p "${2:-results-mpi}" && cd "${2:-results-mpi}" && pwd)
processes=${PROCESSES:-2}
read -r -a args <<<"${ARGS:---limit-train 2048 --epochs 2 --eval-every 2}"

cargo build --release --features mpi --example cifar10
bin=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/cifar10
lscpu | grep -E '^(Model name|CPU\(s\))' | tee "$out/cpu.txt"

common=(--backend flex --data-dir "$data" --no-progress "${args[@]}")
run() {
    local name=$1
    shift
    echo "== $name: $*"
    rm -rf "${out:?}/$name"
    "$@" "${common[@]}" --artifact-dir "$out/$name" >"$out/$name.log" 2>&1
    tail -n 3 "$out/$name.log"
}
run one-process "$bin"
RAYON_NUM_THREADS=1 run one-thread "$bin"
# As root, Open MPI asks to be told.
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 run "$processes-processes" \
    mpirun --oversubscribe -n "$processes" -x RAYON_NUM_THREADS=1 "$bin" --distributed mpi

python3 - "$out" "$processes" <<'EOF'
import json, sys
out, processes = sys.argv[1], sys.argv[2]
print("| run | training images/s | test accuracy | all-reduce share of training |")
print("|---|---:|---:|---:|")
for name in ["one-process", "one-thread", f"{processes}-processes"]:
    s = json.load(open(f"{out}/{name}/summary.json"))
    share = s.get("all_reduce_seconds", 0) / s["train_seconds"]
    print(f"| {name} | {s['images_per_second']:.1f} | {100 * s['test_accuracy']:.2f}% "
          f"| {100 * share:.1f}% |")
EOF
