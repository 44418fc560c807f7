#!/usr/bin/env python3
"""The cases of benches/resnet.rs in PyTorch, with the same shapes, in images per second.

    python3 benches/pytorch_reference.py [--device cpu|cuda] [--threads N] [--json out.json]

Inference: model.eval() under torch.no_grad(). Training step: forward, cross-entropy,
backward, SGD update. fp32 (TF32 off on CUDA). The median of the timed steps is reported,
after warm-up steps, syncing the device inside each timed step as the Rust benches do.
"""
import argparse
import json
import statistics
import time

import torch
import torchvision
from torch import nn

CASES = [
    # name, builder, image size, inference batch, training batch
    ("resnet18_cifar", lambda: cifar_resnet18(), 32, 64, 64),
    ("resnet50_224", lambda: torchvision.models.resnet50(num_classes=1000), 224, 8, 4),
]


def cifar_resnet18():
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device, seconds, min_steps=10):
    step()  # warm-up: allocation, cuDNN autotuning
    step()
    times = []
    start = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement time per case")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--cases", default="", help="comma-separated case names (default all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device), "cases": {}}
    for name, build, size, infer_batch, train_batch in CASES:
        if args.cases and name not in args.cases.split(","):
            continue
        model = build().to(device)
        classes = model.fc.out_features

        model.eval()
        x = torch.randn(infer_batch, 3, size, size, device=device)

        def infer():
            with torch.no_grad():
                model(x)

        t = timed(infer, device, args.seconds)
        results["cases"][f"inference/{name}"] = infer_batch / t

        model.train()
        x = torch.randn(train_batch, 3, size, size, device=device)
        y = torch.arange(train_batch, device=device) % classes
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss_fn = nn.CrossEntropyLoss()

        def train_step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        t = timed(train_step, device, args.seconds)
        results["cases"][f"train_step/{name}"] = train_batch / t
        for case in (f"inference/{name}", f"train_step/{name}"):
            print(f"pytorch {case}: {results['cases'][case]:.1f} images/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
