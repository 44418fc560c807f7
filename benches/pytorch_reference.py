#!/usr/bin/env python3
"""The cases of benches/resnet.rs (with --layers, also those of benches/layers.rs) in
PyTorch, with the same shapes, in images per second.

    python3 benches/pytorch_reference.py [--layers] [--device cpu|cuda] [--threads N] [--json out.json]

Inference: model.eval() under torch.no_grad(). Training step: forward, cross-entropy,
backward, SGD update. Layers: forward under torch.no_grad(), forward plus backward of
the first stage's convolution, and each convolution of ResNet-18's training step with its
BatchNorm (train mode) and ReLU, forward plus backward of the sum. fp32 (TF32 off on CUDA), or with --precision bf16 / f16 under
`torch.autocast` (the model's parameters f32), NCHW or with --channels-last. The median of the timed steps is
reported, after warm-up steps, syncing the device inside each timed step as the Rust
benches do.
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


LAYER_BATCH = 64
# name, input channels, output channels, kernel, stride, input side (as in benches/layers.rs)
CONVS = [
    ("conv3x3_64_32px", 64, 64, 3, 1, 32),
    ("conv3x3_128_16px", 128, 128, 3, 1, 16),
    ("conv3x3_256_8px", 256, 256, 3, 1, 8),
    ("conv3x3_512_4px", 512, 512, 3, 1, 4),
    ("conv3x3_s2_64_32px", 64, 128, 3, 2, 32),
    ("conv3x3_s2_128_16px", 128, 256, 3, 2, 16),
    ("conv3x3_s2_256_8px", 256, 512, 3, 2, 8),
    ("conv1x1_s2_64_32px", 64, 128, 1, 2, 32),
]

# The convolutions of the CIFAR-stem ResNet-18, each with BatchNorm and ReLU: the cases above
# plus how many the network has (as STEP in benches/layers.rs).
STEP = [
    ("stem_conv3x3_3_32px", 3, 64, 3, 1, 32, 1),
    ("conv3x3_64_32px", 64, 64, 3, 1, 32, 4),
    ("conv3x3_s2_64_32px", 64, 128, 3, 2, 32, 1),
    ("conv1x1_s2_64_32px", 64, 128, 1, 2, 32, 1),
    ("conv3x3_128_16px", 128, 128, 3, 1, 16, 3),
    ("conv3x3_s2_128_16px", 128, 256, 3, 2, 16, 1),
    ("conv1x1_s2_128_16px", 128, 256, 1, 2, 16, 1),
    ("conv3x3_256_8px", 256, 256, 3, 1, 8, 3),
    ("conv3x3_s2_256_8px", 256, 512, 3, 2, 8, 1),
    ("conv1x1_s2_256_8px", 256, 512, 1, 2, 8, 1),
    ("conv3x3_512_4px", 512, 512, 3, 1, 4, 3),
]


def layer_cases(device, seconds, autocast, layout):
    """images/s of each layer case of benches/layers.rs."""
    results = {}

    def measure(name, step):
        results[f"layer/{name}"] = LAYER_BATCH / timed(step, device, seconds)
        print(f"pytorch layer/{name}: {results[f'layer/{name}']:.1f} images/s", flush=True)

    def no_grad(module, x):
        def step():
            with torch.no_grad():
                module(x)
        return step

    for name, channels, out, kernel, stride, side in CONVS:
        conv = nn.Conv2d(channels, out, kernel, stride, kernel // 2, bias=False).to(device)
        x = torch.randn(LAYER_BATCH, channels, side, side, device=device)
        measure(name, no_grad(conv, x))
    x = torch.randn(LAYER_BATCH, 64, 32, 32, device=device)
    measure("batchnorm_eval_64_32px", no_grad(nn.BatchNorm2d(64).to(device).eval(), x))
    measure("relu_64_32px", no_grad(nn.ReLU(), x))
    measure("maxpool3x3_s2_64_32px", no_grad(nn.MaxPool2d(3, 2, 1), x))

    conv = nn.Conv2d(64, 64, 3, 1, 1, bias=False).to(device)
    x = torch.randn(LAYER_BATCH, 64, 32, 32, device=device, requires_grad=True)

    def forward_backward():
        x.grad = None
        conv.weight.grad = None
        conv(x).sum().backward()

    measure("conv3x3_64_32px_forward_backward", forward_backward)

    for name, channels, out, kernel, stride, side, _ in STEP:
        unit = nn.Sequential(
            nn.Conv2d(channels, out, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(),
        ).to(device, memory_format=layout).train()
        x = torch.randn(LAYER_BATCH, channels, side, side, device=device).to(memory_format=layout)
        x.requires_grad_(channels != 3)

        def train_layer(unit=unit, x=x):
            x.grad = None
            unit.zero_grad(set_to_none=True)
            with autocast:
                y = unit(x)
            y.float().sum().backward()

        results[f"train_layer/{name}"] = LAYER_BATCH / timed(train_layer, device, seconds)
        print(f"pytorch train_layer/{name}: {results[f'train_layer/{name}']:.1f} images/s", flush=True)
    return results


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
    parser.add_argument("--layers", action="store_true", help="the cases of benches/layers.rs")
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"],
                        help="f32, or mixed precision under torch.autocast with this type")
    parser.add_argument("--channels-last", action="store_true", help="NHWC activations and weights")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    autocast = torch.autocast(
        device.type,
        dtype={"bf16": torch.bfloat16, "f16": torch.float16}.get(args.precision, torch.float32),
        enabled=args.precision != "f32",
    )
    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "precision": args.precision,
        "channels_last": args.channels_last,
        "cases": {},
    }
    if args.layers:
        results["cases"] = layer_cases(device, args.seconds, autocast, layout)
        results["step"] = {name: count for name, *_, count in STEP}
    for name, build, size, infer_batch, train_batch in CASES:
        if args.cases and name not in args.cases.split(","):
            continue
        model = build().to(device, memory_format=layout)
        classes = model.fc.out_features

        model.eval()
        x = torch.randn(infer_batch, 3, size, size, device=device).to(memory_format=layout)

        def infer():
            with torch.no_grad(), autocast:
                model(x)

        t = timed(infer, device, args.seconds)
        results["cases"][f"inference/{name}"] = infer_batch / t

        model.train()
        x = torch.randn(train_batch, 3, size, size, device=device).to(memory_format=layout)
        y = torch.arange(train_batch, device=device) % classes
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss_fn = nn.CrossEntropyLoss()

        def train_step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(model(x), y)
            loss.backward()
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
