#!/usr/bin/env python3
"""Packs CIFAR-10's binary batches small enough to carry to the lent GPU machine (64 MiB a call),
and unpacks them there byte for byte.

Plain xz leaves a batch at 23.2 MB of 30.7; predicting each pixel from its neighbours
(LOCO-I's median predictor, per channel) and coding red and blue as differences from green
first leaves 17.2 MB. Unpacking checks each file's SHA-256 against CIFAR10-SHA256SUMS.

    python3 scripts/cifar10_pack.py pack ../shared/data/cifar-10-batches-bin OUT_DIR [--split 2]
    python3 scripts/cifar10_pack.py unpack PACKED_DIR DATA_DIR [--sums CIFAR10-SHA256SUMS]

--split N packs each batch as N parts (NAME.partKofN.pk) that can travel in different calls;
unpack writes a batch once all its parts have arrived (and keeps the parts until then).
"""
import argparse
import hashlib
import lzma
import pathlib
import sys

import numpy as np

RECORD = 3073


def neighbours(img, y, x):
    """The left, upper and upper-left neighbours of column x in row y (0 outside the image)."""
    a = img[..., y, x - 1] if x > 0 else 0
    b = img[..., y - 1, x] if y > 0 else 0
    c = img[..., y - 1, x - 1] if x > 0 and y > 0 else 0
    return a, b, c


def median_prediction(a, b, c):
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    return np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))


def pack(raw: bytes) -> bytes:
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)
    img = records[:, 1:].reshape(-1, 3, 32, 32).astype(np.int16)
    zero = np.zeros_like(img)
    a = zero.copy(); a[..., 1:] = img[..., :-1]
    b = zero.copy(); b[..., 1:, :] = img[..., :-1, :]
    c = zero.copy(); c[..., 1:, 1:] = img[..., :-1, :-1]
    residual = img - median_prediction(a, b, c)
    residual[:, 0] -= residual[:, 1]
    residual[:, 2] -= residual[:, 1]
    body = records[:, 0].tobytes() + (residual & 255).astype(np.uint8).tobytes()
    return lzma.compress(body, preset=9 | lzma.PRESET_EXTREME)


def unpack(packed: bytes) -> bytes:
    body = np.frombuffer(lzma.decompress(packed), dtype=np.uint8)
    n = len(body) // RECORD
    labels = body[:n]
    residual = body[n:].reshape(n, 3, 32, 32).astype(np.int16)
    residual[:, 0] += residual[:, 1]
    residual[:, 2] += residual[:, 1]
    img = np.zeros_like(residual)
    for y in range(32):
        for x in range(32):
            a, b, c = neighbours(img, y, x)
            img[..., y, x] = (median_prediction(a, b, c) + residual[..., y, x]) & 255
    records = np.empty((n, RECORD), dtype=np.uint8)
    records[:, 0] = labels
    records[:, 1:] = img.reshape(n, -1)
    return records.tobytes()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["pack", "unpack"])
    parser.add_argument("source")
    parser.add_argument("dest")
    parser.add_argument("--files", default=None, help="comma-separated batch names (default: all)")
    parser.add_argument("--sums", default=None, help="CIFAR10-SHA256SUMS to check unpacked files against")
    parser.add_argument("--split", type=int, default=1, help="pack each batch as this many parts")
    args = parser.parse_args()
    source, dest = pathlib.Path(args.source), pathlib.Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    if args.command == "pack":
        names = args.files.split(",") if args.files else sorted(p.name for p in source.glob("*.bin"))
        for name in names:
            raw = (source / name).read_bytes()
            records = len(raw) // RECORD
            for k in range(args.split):
                part = raw[k * records // args.split * RECORD:(k + 1) * records // args.split * RECORD]
                packed = pack(part)
                assert unpack(packed) == part, f"{name}: the round trip changed bytes"
                out = name + (f".part{k}of{args.split}" if args.split > 1 else "") + ".pk"
                # Written whole or not at all: a file that is there is complete.
                (dest / (out + ".tmp")).write_bytes(packed)
                (dest / (out + ".tmp")).replace(dest / out)
                print(f"{out}: {len(part)} -> {len(packed)} bytes", flush=True)
        return
    sums = {}
    if args.sums:
        for line in pathlib.Path(args.sums).read_text().splitlines():
            digest, name = line.split()
            sums[pathlib.Path(name.lstrip("*")).name] = digest
    packed_files = sorted(source.glob("*.pk"))
    if not packed_files:
        sys.exit(f"no packed batches (*.pk) in {source}: was it carried?")
    for packed in packed_files:
        name = packed.name[: -len(".pk")]
        raw = unpack(packed.read_bytes())
        if ".part" in name:
            (dest / name).write_bytes(raw)
            name, part = name.rsplit(".part", 1)
            count = int(part.split("of")[1])
            parts = [dest / f"{name}.part{k}of{count}" for k in range(count)]
            if not all(p.exists() for p in parts):
                print(f"{name}: part {part} unpacked, waiting for the others", flush=True)
                continue
            raw = b"".join(p.read_bytes() for p in parts)
            for p in parts:
                p.unlink()
        digest = hashlib.sha256(raw).hexdigest()
        if sums and sums.get(name) != digest:
            sys.exit(f"{name}: SHA-256 {digest} does not match {args.sums}")
        (dest / name).write_bytes(raw)
        print(f"{name}: {len(raw)} bytes, sha256 ok" if sums else f"{name}: {len(raw)} bytes", flush=True)


if __name__ == "__main__":
    main()
