#!/usr/bin/env python3
"""The rounding error of Winograd's F(4x4, 3x3) in f32 for a choice of interpolation points.

F(m, 3) interpolates at m + 1 points and infinity (Toom-Cook). This derives `A^T`, `G` and
`B^T` for each set of points below, exactly (sympy), then convolves random 6x6 input blocks
of C channels by He-initialized 3x3 kernels in f32 through them and prints the largest error
against the direct convolution in f64, relative to the output's largest magnitude, and the
relative RMS error. `crates/burn-cpu-kernels/src/winograd.rs` takes the points with the
smaller error, 0, 1, -1, 1/2 and -2 (with `B^T` scaled to integers), where Lavin and Gray's
are 0, 1, -1, 2 and -2.

    python3 scripts/winograd_points.py [--channels 128] [--blocks 2000] [--show]
"""

import argparse

import numpy as np
import sympy as sp

POINTS = [
    ["0", "1", "-1", "2", "-2"],  # Lavin and Gray
    ["0", "1", "-1", "1/2", "-2"],  # resnet-burn
    ["0", "1", "-1", "1/2", "-1/2"],
    ["0", "1", "-1", "3/2", "-3/2"],
]


def matrices(points, m=4, r=3):
    """`A^T`, `G` and `B^T` of F(m, r) at `points` and infinity, with `G` holding the
    fractions (as wincnn does), solved for `B^T` from the definition of the correlation."""
    n = m + r - 1
    a = [sp.Rational(p) for p in points]
    assert len(a) == n - 1
    at = sp.zeros(m, n)
    for i in range(m):
        for j in range(n - 1):
            at[i, j] = a[j] ** i
    at[m - 1, n - 1] = 1
    g = sp.zeros(n, r)
    for j in range(n - 1):
        f = sp.prod([a[j] - a[k] for k in range(n - 1) if k != j])
        for k in range(r):
            g[j, k] = a[j] ** k / f
    g[n - 1, r - 1] = 1
    bt = sp.Matrix(n, n, lambda i, j: sp.Symbol(f"b{i}_{j}"))
    equations = []
    for k in range(r):
        for d in range(n):
            kernel = sp.zeros(r, 1)
            kernel[k] = 1
            data = sp.zeros(n, 1)
            data[d] = 1
            y = at * sp.matrix_multiply_elementwise(g * kernel, bt * data)
            equations += [sp.expand(y[i] - (1 if d == i + k else 0)) for i in range(m)]
    bt = bt.subs(sp.solve(equations, list(bt)))
    return at, g, bt


def errors(at, g, bt, channels, blocks, seed):
    rng = np.random.default_rng(seed)
    at, g, bt = (np.array(x.tolist(), dtype=np.float64) for x in (at, g, bt))
    d = rng.uniform(-1, 1, (blocks, channels, 6, 6))
    w = rng.uniform(-1, 1, (channels, 3, 3)) * np.sqrt(2 / (9 * channels))
    exact = np.zeros((blocks, 4, 4))
    for i in range(3):
        for j in range(3):
            exact += np.einsum("tcxy,c->txy", d[:, :, i : i + 4, j : j + 4], w[:, i, j])
    # The kernels' transform exact, rounded once; the rest in f32.
    u = np.einsum("ik,ckl,jl->cij", g, w, g).astype(np.float32)
    at32, bt32, d32 = at.astype(np.float32), bt.astype(np.float32), d.astype(np.float32)
    v = np.einsum("ik,tckl,jl->tcij", bt32, d32, bt32)
    y = np.einsum("ik,tkl,jl->tij", at32, np.einsum("tcij,cij->tij", v, u), at32)
    largest = np.abs(y - exact).max() / np.abs(exact).max()
    rms = np.sqrt(np.mean((y - exact) ** 2) / np.mean(exact**2))
    return largest, rms


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=2000)
    parser.add_argument("--show", action="store_true", help="print the matrices")
    args = parser.parse_args()
    for points in POINTS:
        at, g, bt = matrices(points)
        results = [errors(at, g, bt, args.channels, args.blocks, seed) for seed in (0, 1)]
        print(
            f"points {', '.join(points)}, infinity: largest error "
            f"{max(r[0] for r in results):.2e}, RMS {max(r[1] for r in results):.2e}"
        )
        if args.show:
            for name, x in (("A^T", at), ("G", g), ("B^T", bt)):
                print(f"  {name} = {x.tolist()}")


if __name__ == "__main__":
    main()
