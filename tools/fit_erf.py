#!/usr/bin/env python3
"""Fit the rational `erf` of `crates/vitrs/src/kernels/math.rs` (`ERF_P`, `ERF_Q`).

    erf(x) ~= x * P(x^2) / Q(x^2)   for |x| <= 3.92   (P(0) = 2/sqrt(pi), erf's slope; Q(0) = 1)

3.92 is where erf(x) rounds to 1 in f32 (1 - erf(3.92) = 3e-8), so clamping the argument there
makes the form exact to f32 beyond it. Degrees 5 and 5 give a maximum absolute error of 1.6e-8
in f64 (the f32 evaluation adds its rounding, a few 1e-7 at most; the Rust test bounds it).

The fit: the linearised least-squares problem `x P(t) - erf(x) Q(t) = 0` on a dense grid,
re-weighted by 1/|Q| (Sanathanan-Koerner) and by the square root of the last error (Lawson),
keeping the iterate with the smallest maximum error. Needs numpy only.

    python tools/fit_erf.py            # prints the coefficients as Rust f32 literals
"""

import math

import numpy as np

CLAMP = 3.92
DEG_P, DEG_Q = 5, 5


def fit(deg_p, deg_q, clamp, iters=60):
    x = np.linspace(0.0, clamp, 20001)[1:]
    t = x * x
    y = np.array([math.erf(v) for v in x])
    # Unknowns p1..p_{deg_p}, q1..q_{deg_q}; the residual x P(t) - y Q(t) with q0 = 1 and
    # p0 = 2/sqrt(pi), erf's slope at 0.
    p0 = 2.0 / math.sqrt(math.pi)
    a = np.hstack(
        [
            x[:, None] * t[:, None] ** np.arange(1, deg_p + 1),
            -y[:, None] * t[:, None] ** np.arange(1, deg_q + 1),
        ]
    )
    rhs = y - p0 * x
    w = np.ones_like(x)
    q_prev = np.ones_like(x)
    best = None
    for _ in range(iters):
        wt = w / np.abs(q_prev)
        sol, *_ = np.linalg.lstsq(a * wt[:, None], rhs * wt, rcond=None)
        p = np.concatenate([[p0], sol[:deg_p]])
        q = np.concatenate([[1.0], sol[deg_p:]])
        q_prev = np.polyval(q[::-1], t)
        err = x * np.polyval(p[::-1], t) / q_prev - y
        worst = np.abs(err).max()
        if best is None or worst < best[0]:
            best = (worst, p, q)
        w = w * np.sqrt(np.abs(err)) + 1e-30
        w /= w.max()
    return best


def main():
    worst, p, q = fit(DEG_P, DEG_Q, CLAMP)
    print(f"// max abs error in f64 on [0, {CLAMP}]: {worst:.2e}")
    lit = lambda cs: ", ".join(str(np.float32(c)) for c in cs)  # noqa: E731
    print(f"const ERF_P: [f32; {DEG_P + 1}] = [{lit(p)}];")
    print(f"const ERF_Q: [f32; {DEG_Q + 1}] = [{lit(q)}];")


if __name__ == "__main__":
    main()
