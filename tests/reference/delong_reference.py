"""Reference numbers for melanoflow's DeLong test (stages/evaluate/paired.rs).

An independent implementation of DeLong, DeLong & Clarke-Pearson (1988),
"Comparing the areas under two or more correlated receiver operating
characteristic curves: a nonparametric approach", Biometrics 44:837-845, in
its direct O(m n) form: the placement values (structural components)
V10 and V01 from the pairwise kernel psi(x, y) = 1 if x > y, 1/2 if x == y,
0 otherwise; the 2x2 covariance matrices S10 and S01 (n - 1 denominators);
var(AUC_a - AUC_b) = c' (S10 / m + S01 / n) c with c = (1, -1); z and the
two-sided normal p-value from scipy. No ranks, so nothing is shared with the
Rust's midrank algorithm (Sun & Xu 2014).

The test case is built from integers by the same formula as the Rust test
(`reference_case` in paired.rs), so both sides see identical scores with
many ties. Run with numpy + scipy:
    python3 -m venv /tmp/venv-delong && /tmp/venv-delong/bin/pip install numpy scipy
    /tmp/venv-delong/bin/python tests/reference/delong_reference.py
and paste the printed array into `REFERENCE` in paired.rs.
"""
import numpy as np
from scipy.stats import norm


def reference_case():
    i = np.arange(300, dtype=np.int64)
    y = ((7 * i) % 10) < 3
    u = (37 * i) % 101
    v = (53 * i + 11) % 97
    a = (u // 4 + 6 * y).astype(np.float64)
    b = ((u + v) // 20 + 2 * y).astype(np.float64)
    return a, b, y


def placements(scores, y):
    """V10 per positive (mean kernel over negatives), V01 per negative
    (mean kernel over positives), from the full m x n kernel matrix."""
    pos, neg = scores[y], scores[~y]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return kernel.mean(axis=1), kernel.mean(axis=0), kernel.mean()


def delong(a, b, y):
    v10a, v01a, auc_a = placements(a, y)
    v10b, v01b, auc_b = placements(b, y)
    m, n = len(v10a), len(v01a)
    s10 = np.cov(np.vstack([v10a, v10b]))  # rows are variables, ddof = 1
    s01 = np.cov(np.vstack([v01a, v01b]))
    c = np.array([1.0, -1.0])
    variance = c @ (s10 / m + s01 / n) @ c
    se = np.sqrt(variance)
    difference = auc_a - auc_b
    z = difference / se
    p = 2.0 * norm.sf(abs(z))
    return auc_a, auc_b, difference, variance, se, z, p


def hand_case():
    """The small case worked by hand in paired.rs's `hand_checked_case`."""
    y = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    a = np.array([0.9, 0.8, 0.4, 0.5, 0.3, 0.1])
    b = np.array([0.7, 0.5, 0.6, 0.6, 0.2, 0.4])
    return a, b, y


if __name__ == "__main__":
    a, b, y = reference_case()
    print(f"positives {y.sum()} of {len(y)}; distinct scores a {len(np.unique(a))}, b {len(np.unique(b))}")
    names = ["auc_a", "auc_b", "difference", "variance", "se", "z", "p"]
    values = delong(a, b, y)
    for name, value in zip(names, values):
        print(f"{name:>10} {float(value)!r}")
    print("REFERENCE = [" + ", ".join(repr(float(v)) for v in values) + "]")
    print("hand case:", [float(v) for v in delong(*hand_case())])
