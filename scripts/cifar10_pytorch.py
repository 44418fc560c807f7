#!/usr/bin/env python3
"""The recipe of examples/cifar10.rs in PyTorch, as a reference for accuracy and speed:
ResNet-18 with the CIFAR stem, SGD + Nesterov 0.9, weight decay on conv/linear weights only,
linear warm-up then cosine per step, label smoothing, crop + flip, the same data files.

    python3 scripts/cifar10_pytorch.py --data-dir ../shared/data/cifar-10-batches-bin \
        --limit-train 2000 --limit-test 1000 --epochs 2
"""
import argparse
import json
import math
import pathlib
import time

import numpy as np
import torch
import torchvision
from torch import nn

MEAN = np.array([125.307, 122.950, 113.865], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([62.993, 62.089, 66.705], dtype=np.float32).reshape(1, 3, 1, 1)


def load(directory, files, limit):
    raw = b"".join((pathlib.Path(directory) / f).read_bytes() for f in files)
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
    if limit:
        records = records[:limit]
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def augment(images, rng):
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    out = np.empty_like(images)
    for i in range(len(images)):
        y, x = rng.integers(0, 9, size=2)
        crop = padded[i, :, y:y + 32, x:x + 32]
        out[i] = crop[:, :, ::-1] if rng.integers(0, 2) else crop
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tf32", action="store_true",
                   help="let cuDNN and cuBLAS use TF32 (PyTorch's default for convolutions); "
                        "off by default: the comparison is in strict fp32 like Burn's")
    p.add_argument("--amp-f16", action="store_true",
                   help="mixed precision as PyTorch recommends it: autocast to float16 (convolutions "
                        "and the linear layer in f16, BatchNorm in f32) with a GradScaler; compare "
                        "with the example's --precision f16 (convolutions only in f16)")
    p.add_argument("--json", default=None, help="write per-epoch metrics and images/s here")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)

    train_x, train_y = load(args.data_dir, [f"data_batch_{i}.bin" for i in range(1, 6)], args.limit_train)
    test_x, test_y = load(args.data_dir, ["test_batch.bin"], args.limit_test)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
    steps = len(train_x) // args.batch_size
    total, warmup = steps * args.epochs, round(args.warmup_epochs * steps)
    lr_at = lambda s: args.lr * (s + 1) / warmup if s < warmup else 0.5 * args.lr * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=args.amp_f16)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp_f16)
    step = 0
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(train_x))
        start, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        for b in range(steps):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            x = torch.from_numpy((augment(train_x[idx], rng).astype(np.float32) - MEAN) / STD).to(device)
            y = torch.from_numpy(train_y[idx]).to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with autocast:
                out = model(x)
                loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == y).sum().item()
        seconds = time.time() - start
        model.eval()
        with torch.no_grad():
            hits = 0
            for b in range(0, len(test_x), 500):
                x = torch.from_numpy((test_x[b:b + 500].astype(np.float32) - MEAN) / STD).to(device)
                hits += (model(x).argmax(1).cpu() == torch.from_numpy(test_y[b:b + 500])).sum().item()
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                        "test_accuracy": hits / len(test_x), "seconds": seconds, "images_per_second": seen / seconds})
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({
                "torch": torch.__version__, "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "tf32": args.tf32, "amp_f16": args.amp_f16, "batch_size": args.batch_size, "epochs": history}, indent=1))
        print(f"epoch {epoch + 1}: train loss {loss_sum / seen:.4f} acc {100 * correct / seen:.2f}%  "
              f"test acc {100 * hits / len(test_x):.2f}%  {seconds:.1f}s  {seen / seconds:.0f} img/s", flush=True)


if __name__ == "__main__":
    main()
