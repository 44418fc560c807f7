#!/usr/bin/env python3
"""Feature extraction of the linear probe, end to end, against PyTorch in the same run: the
images of a folder read, transformed for evaluation (resize 256, center crop 224, normalize)
and passed through a ResNet's backbone, in images per second.

    python3 benches/probe_features.py --make-folder 32 --data /tmp/probe-folder   # from $CIFAR10_DIR
    python3 benches/probe_features.py --data /tmp/probe-folder [--model resnet50] [--threads 2]

resnet-burn: `examples/finetune --freeze backbone --epochs 1 --weights none` on flex (built with
`cargo build --release --example finetune`), its summary's feature_images_per_second (the
features of the training and validation images; decoding and transforms on --threads worker
threads while the network runs). PyTorch: torchvision's ImageFolder with the same transform,
a DataLoader with --threads workers, the model with fc = Identity under torch.no_grad(), and
torch.set_num_threads(--threads). --make-folder writes N CIFAR-10 test images per class, upscaled
to 320x240 and saved as JPEG (quality 90), as photographs of that size come.
"""
import argparse
import json
import os
import pathlib
import subprocess
import tempfile
import time

import torch
import torchvision
from torch import nn
from torchvision import transforms

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cpu_model():
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def make_folder(data, per_class):
    import numpy as np
    from PIL import Image

    source = pathlib.Path(os.environ["CIFAR10_DIR"]) / "test_batch.bin"
    records = np.frombuffer(source.read_bytes(), dtype=np.uint8).reshape(-1, 3073)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    counts = [0] * 10
    for record in records:
        label = int(record[0])
        if counts[label] >= per_class:
            continue
        counts[label] += 1
        image = Image.fromarray(record[1:].reshape(3, 32, 32).transpose(1, 2, 0))
        folder = data / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.resize((320, 240), Image.BILINEAR).save(folder / f"{counts[label]:04}.jpg", quality=90)


def burn(data, model, threads, batch):
    binary = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release/examples/finetune"
    with tempfile.TemporaryDirectory() as artifacts:
        subprocess.run([str(binary), "--data", str(data), "--weights", "none", "--model", model,
                        "--freeze", "backbone", "--epochs", "1", "--backend", "flex",
                        "--eval-batch-size", str(batch), "--workers", str(threads),
                        "--artifact-dir", artifacts, "--no-progress"], check=True)
        summary = json.loads((pathlib.Path(artifacts) / "summary.json").read_text())
    return summary["feature_images_per_second"]


def pytorch(data, model, threads, batch):
    torch.set_num_threads(threads)
    transform = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    dataset = torchvision.datasets.ImageFolder(str(data), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=threads)
    network = getattr(torchvision.models, model)()
    network.fc = nn.Identity()
    network.eval()
    started = time.perf_counter()
    images = 0
    with torch.no_grad():
        for inputs, _ in loader:
            network(inputs)
            images += len(inputs)
    return images / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, type=pathlib.Path)
    parser.add_argument("--make-folder", type=int, default=None, metavar="N")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.make_folder:
        make_folder(args.data, args.make_folder)
    burn_rate = burn(args.data, args.model, args.threads, args.batch)
    torch_rate = pytorch(args.data, args.model, args.threads, args.batch)
    print(f"\n{cpu_model()}, {args.threads} threads, torch {torch.__version__}")
    print("| case | resnet-burn (flex) images/s | PyTorch images/s | resnet-burn / PyTorch |")
    print("|---|---:|---:|---:|")
    print(f"| probe features, {args.model} 224, batch {args.batch} | {burn_rate:.1f} | {torch_rate:.1f} | {burn_rate / torch_rate:.2f}x |")


if __name__ == "__main__":
    main()
