"""Reference numbers for melanoflow's fidelity measures (stages/fidelity/measures.rs).

Two pairs of feature matrices built from a formula the Rust test repeats: case A
has more samples than features (40 and 50 rows of 6), case B fewer (20 and 30
rows of 64, so both covariances are singular). For each, prints:
  - the Fréchet distance, with scipy.linalg.sqrtm as pytorch-fid computes it
    (sqrtm of sigma1 @ sigma2, real part) and, as a cross-check that matters
    for the singular case, with sqrtm of the symmetric sigma1^1/2 sigma2 sigma1^1/2;
  - the unbiased MMD^2 with the kernel (x.y/d + 1)^3 on the full sets (KID's
    statistic, Binkowski et al. 2018);
  - k-NN precision and recall with k = 3 (Kynkaanniemi et al. 2019) from
    scipy.spatial.distance.cdist.
Run with numpy and scipy (no other dependency):
    python3 -m venv /tmp/venv-fid && /tmp/venv-fid/bin/pip install numpy scipy
    /tmp/venv-fid/bin/python tests/reference/fidelity_reference.py
and paste the tuples into REF_A / REF_B in the Rust test.
"""
import math

import numpy as np
import scipy
from scipy.linalg import sqrtm
from scipy.spatial.distance import cdist


def features(n, d, phase, shift):
    x = np.empty((n, d))
    for i in range(n):
        for j in range(d):
            x[i, j] = (
                math.sin(0.9 * i + 1.7 * j + phase)
                + 0.5 * math.cos(0.31 * i * j + 0.2 * j)
                + 0.25 * math.sin(2.3 * i + phase * j) * math.cos(0.7 * j)
                + shift * (0.5 + 0.1 * j)
            )
    return x


def frechet(x, y):
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    fd = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    h = np.real(sqrtm(s1))
    sym = np.real(sqrtm(h @ s2 @ h))
    fd_sym = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sym)
    return fd, fd_sym


def mmd2_unbiased(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def precision_recall(real, fake, k=3):
    def radii(a):
        d = cdist(a, a)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    rr, rf = radii(real), radii(fake)
    d = cdist(real, fake)  # [real, fake]
    precision = (d <= rr[:, None]).any(axis=0).mean()
    recall = (d <= rf[None, :]).any(axis=1).mean()
    return precision, recall


print(f"numpy {np.__version__}, scipy {scipy.__version__}")
for name, (x, y) in {
    "A": (features(40, 6, 0.3, 0.0), features(50, 6, 1.1, 0.4)),
    "B": (features(20, 64, 0.3, 0.0), features(30, 64, 0.8, 0.1)),
}.items():
    fd, fd_sym = frechet(x, y)
    p, r = precision_recall(x, y)
    print(f"case {name}: FD with sqrtm(s1 s2) {float(fd)!r}, with sqrtm(s1^1/2 s2 s1^1/2) {float(fd_sym)!r}")
    numbers = ", ".join(repr(float(v)) for v in (fd, mmd2_unbiased(x, y), p, r))
    print(f"const REF_{name}: (f64, f64, f64, f64) = ({numbers});")
