#!/usr/bin/env python3
"""Runs the Burn benches and the PyTorch reference in one go, on this machine, and prints
images/s for each case and backend with the ratio Burn / PyTorch.

    python3 benches/compare.py [--backends flex,ndarray,wgpu] [--cases resnet18_cifar]
    python3 benches/compare.py --bench layers [--backends flex]
    python3 benches/compare.py --backends wgpu --torch-device cuda --bench-binary PATH
    python3 benches/compare.py --backends flex --precision bf16
    python3 benches/compare.py --backends flex --threads 1

With --bench layers, also a ResNet-18 training step layer by layer: each convolution with its
BatchNorm and ReLU, forward and backward, times how often the network has it, in milliseconds
per step, beside the whole step (the resnet bench's train_step/resnet18_cifar, run too) and
what the layers leave (pooling, the classifier, the loss, the additions, the update).

With --bench-binary, a bench built elsewhere (`cargo bench --bench resnet --no-run` prints its
path) runs without cargo, e.g. on a GPU machine; criterion then writes under $CRITERION_HOME
(default ./criterion-results).

Burn's figures come from criterion (`cargo bench --bench resnet` or `--bench layers`), read
back from
target/criterion/*/new/estimates.json (median time per iteration); PyTorch's from
benches/pytorch_reference.py with the same threads. With --precision bf16 (or f16) the model
runs in that precision (BENCH_PRECISION) and PyTorch under torch.autocast, in NCHW and in
channels_last: the faster of the two is the reference. --threads N gives both N threads (rayon's
RAYON_NUM_THREADS, torch.set_num_threads); by default each takes every core. Writes the table
as Markdown too.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BATCH = {
    "inference/resnet18_cifar": 64,
    "train_step/resnet18_cifar": 64,
    "inference/resnet50_224": 8,
    "train_step/resnet50_224": 4,
}
LAYERS = [
    "conv3x3_64_32px",
    "conv3x3_128_16px",
    "conv3x3_256_8px",
    "conv3x3_512_4px",
    "conv3x3_s2_64_32px",
    "conv3x3_s2_128_16px",
    "conv3x3_s2_256_8px",
    "conv1x1_s2_64_32px",
    "batchnorm_eval_64_32px",
    "relu_64_32px",
    "maxpool3x3_s2_64_32px",
    "conv3x3_64_32px_forward_backward",
]
STEP_CASE = "train_step/resnet18_cifar"
LAYER_BATCH = 64


def cpu_model():
    """The CPU's model name, as lscpu prints it."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def target_dir():
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return pathlib.Path(json.loads(out)["target_directory"])


def median_seconds(criterion, case, id):
    """criterion's median time per iteration of `case` (group/name) under `id`, or None."""
    estimates = criterion / case / id / "new" / "estimates.json"
    if not estimates.exists():
        return None
    return json.loads(estimates.read_text())["median"]["point_estimate"] / 1e9


def step_table(criterion, backend, suffix, torch_results, counts):
    """A ResNet-18 training step layer by layer, in milliseconds per step, as Markdown rows."""
    rows = [
        f"| layer (conv, BN, ReLU; forward and backward) | count | {backend}{suffix} ms | PyTorch ms | Burn / PyTorch | {backend}{suffix} ms per step | PyTorch ms per step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    totals = [0.0, 0.0]
    for name, count in counts.items():
        burn = median_seconds(criterion, f"train_layer/{name}", backend + suffix)
        images_per_s = torch_results["cases"].get(f"train_layer/{name}")
        if burn is None or not images_per_s:
            return []
        torch_s = LAYER_BATCH / images_per_s
        totals[0] += burn * count
        totals[1] += torch_s * count
        rows.append(f"| {name} | {count} | {burn * 1e3:.1f} | {torch_s * 1e3:.1f} | {torch_s / burn:.2f}x "
                    f"| {burn * count * 1e3:.1f} | {torch_s * count * 1e3:.1f} |")
    rows.append(f"| all convolution layers | | | | {totals[1] / totals[0]:.2f}x | {totals[0] * 1e3:.1f} | {totals[1] * 1e3:.1f} |")
    burn_step = median_seconds(criterion, STEP_CASE, backend + suffix)
    torch_step = torch_results["cases"].get(STEP_CASE)
    if burn_step is not None and torch_step:
        torch_step = BATCH[STEP_CASE] / torch_step
        rows.append(f"| the rest (pooling, classifier, loss, additions, update) | | | | "
                    f"{(torch_step - totals[1]) / (burn_step - totals[0]):.2f}x "
                    f"| {(burn_step - totals[0]) * 1e3:.1f} | {(torch_step - totals[1]) * 1e3:.1f} |")
        rows.append(f"| whole step (train_step/resnet18_cifar) | | | | {torch_step / burn_step:.2f}x "
                    f"| {burn_step * 1e3:.1f} | {torch_step * 1e3:.1f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bench", default="resnet", choices=["resnet", "layers"])
    parser.add_argument("--backends", default="flex,ndarray,wgpu")
    parser.add_argument("--cases", default="resnet18_cifar,resnet50_224")
    parser.add_argument("--torch-device", default="cpu")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--bench-binary", default=None, help="a prebuilt criterion bench to run instead of cargo bench")
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"])
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: every core)")
    args = parser.parse_args()
    mixed = args.precision != "f32"
    suffix = f"-{args.precision}" if mixed else ""

    layers = args.bench == "layers"
    if layers:
        cases = LAYERS
    else:
        cases = args.cases.split(",")
    backends = args.backends.split(",")
    env = dict(os.environ, BENCH_BACKENDS=args.backends, BENCH_PRECISION=args.precision)
    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.threads:
        env["RAYON_NUM_THREADS"] = str(args.threads)
    on = "/(" + "|".join(backends) + ")" + suffix + "$"
    # The forward layers in f32 only, the layers of the step in the model's precision.
    filter_regex = "(" + "|".join(cases) + ")" + on
    if layers:
        filter_regex = "(layer/(" + "|".join(cases) + ")/(" + "|".join(backends) + ")$|train_layer/.*" + on + ")"
    if args.bench_binary:
        criterion = pathlib.Path(env.setdefault("CRITERION_HOME", str(pathlib.Path("criterion-results").resolve())))
        subprocess.run([args.bench_binary, "--bench", filter_regex], env=env, check=True)
    else:
        criterion = target_dir() / "criterion"
        subprocess.run(["cargo", "bench", "--bench", args.bench, "--", filter_regex], cwd=ROOT, env=env, check=True)
        if layers:
            subprocess.run(["cargo", "bench", "--bench", "resnet", "--", STEP_CASE + on], cwd=ROOT, env=env, check=True)

    torch_json = pathlib.Path("target-pytorch.json").resolve()
    layouts = [[], ["--channels-last"]] if mixed else [[]]
    torch_runs = []
    for layout in layouts:
        subprocess.run(
            [sys.executable, str(ROOT / "benches/pytorch_reference.py"), "--device", args.torch_device,
             "--json", str(torch_json), "--cases", "resnet18_cifar" if layers else ",".join(cases),
             "--precision", args.precision]
            + layout + threads + (["--layers"] if layers else []),
            cwd=ROOT, check=True,
        )
        torch_runs.append(json.loads(torch_json.read_text()))
        torch_json.unlink()
    torch_results = torch_runs[0]
    # The faster layout for each case; for the layers of the step, the layout of the faster
    # whole step, so that the layers add up to it.
    step_layout = max(torch_runs, key=lambda run: run["cases"].get(STEP_CASE, 0.0))
    for run in torch_runs[1:]:
        for case, value in run["cases"].items():
            torch_results["cases"][case] = max(value, torch_results["cases"].get(case, 0.0))

    rows = ["| case | backend | Burn images/s | PyTorch images/s | Burn / PyTorch |", "|---|---|---:|---:|---:|"]
    batches = {f"layer/{name}": LAYER_BATCH for name in cases} if layers else BATCH
    for case in batches:
        group, name = case.split("/")
        if name not in cases:
            continue
        reference = torch_results["cases"].get(case)
        for backend in backends:
            estimates = criterion / group / name / (backend + suffix) / "new" / "estimates.json"
            if not estimates.exists():
                continue
            seconds = json.loads(estimates.read_text())["median"]["point_estimate"] / 1e9
            burn = batches[case] / seconds
            ratio = f"{burn / reference:.2f}x" if reference else "-"
            torch_figure = f"{reference:.1f}" if reference else "-"
            rows.append(f"| {case} | {backend}{suffix} | {burn:.1f} | {torch_figure} | {ratio} |")
    if layers:
        for case, value in step_layout["cases"].items():
            if case.startswith("train_layer/"):
                torch_results["cases"][case] = value
        for backend in backends:
            rows += [""] + step_table(criterion, backend, suffix, torch_results, step_layout.get("step", {}))
    table = "\n".join(rows)
    precision = f", autocast {args.precision} (faster of NCHW and channels_last)" if mixed else ""
    print(f"\nPyTorch {torch_results['torch']} on {torch_results['device']}, {torch_results['threads']} threads{precision}; CPU: {cpu_model()}\n")
    print(table)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
