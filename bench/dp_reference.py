"""Reference values for greyfed's RDP accountant (protocol/src/privacy/).

Prints the two tables of protocol/src/privacy/tests.rs:

- `REFERENCE`: epsilon of the Poisson-subsampled Gaussian mechanism composed
  over `steps`, three ways: Google's dp_accounting (RdpAccountant,
  add-or-remove-one neighbours, the improved RDP-to-(epsilon, delta)
  conversion) at its default orders; the same at the integer orders only
  (where its RDP is an exact binomial sum); and the same conversion applied
  to RDP computed from the definition with mpmath at every default order.
  At fractional orders dp_accounting's series can lose precision or, after
  1,000 terms, leave the order out; the third column does not depend on it.
- `RDP_BY_QUADRATURE`: the RDP of one application at single orders,
  ln(E[(mu(z)/mu0(z))^alpha]) / (alpha - 1), integrated numerically from the
  definition with mpmath (40 digits), independent of either accountant's
  series.

    python3 -m venv /tmp/dpenv && /tmp/dpenv/bin/pip install dp-accounting mpmath
    /tmp/dpenv/bin/python bench/dp_reference.py

greyfed itself never needs Python or dp_accounting.
"""

import logging

import dp_accounting
import mpmath as mp
from dp_accounting import rdp
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

GRID_Q = [0.001, 0.01, 0.05, 0.2, 1.0]
GRID_SIGMA = [0.6, 0.8, 1.1, 2.0, 5.0]
GRID_STEPS = [1, 50, 1000, 20000]
DELTAS = [1e-5, 1e-7]


# dp_accounting warns for every order whose series it gives up on.
logging.getLogger("absl").setLevel(logging.ERROR)
mp.mp.dps = 30
INTEGER_ORDERS = [o for o in DEFAULT_RDP_ORDERS if float(o).is_integer()]


def rdp_quadrature(q, sigma, alpha):
    """RDP of one application at order alpha, from the definition: an exact
    binomial sum at integer orders, numerical integration otherwise."""
    if float(alpha).is_integer():
        n = int(alpha)
        a = mp.fsum(
            mp.binomial(n, k) * (1 - mp.mpf(q)) ** (n - k) * mp.mpf(q) ** k * mp.e ** (mp.mpf(k * k - k) / (2 * sigma * sigma))
            for k in range(n + 1)
        )
    else:

        def f(z):
            return mp.npdf(z, 0, sigma) * ((1 - q) + q * mp.e ** ((2 * z - 1) / (2 * sigma * sigma))) ** alpha

        a = mp.quad(f, [-mp.inf, -5, 0, 0.5, 1, 5, mp.inf])
    return float(mp.log(a) / (alpha - 1))


def epsilon_from(orders, rdps, delta):
    """The improved RDP-to-(epsilon, delta) conversion, minimised over orders."""
    best = float("inf")
    for alpha, r in zip(orders, rdps):
        if delta * delta + mp.expm1(-r) >= 0:
            return 0.0
        if alpha <= 1.01:
            continue
        best = min(best, r + mp.log1p(-1 / alpha) - mp.log(delta * alpha) / (alpha - 1))
    return float(max(best, 0.0))


def dp_accounting_epsilon(q, sigma, steps, delta, orders=None):
    acc = rdp.RdpAccountant(orders=orders)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    return float(acc.get_epsilon(delta))


print("const REFERENCE: &[(f64, f64, u64, f64, [f64; 3])] = &[")
for q in GRID_Q:
    for sigma in GRID_SIGMA:
        per_order = [rdp_quadrature(q, sigma, a) for a in DEFAULT_RDP_ORDERS]
        for delta in DELTAS:
            for steps in GRID_STEPS:
                eps = dp_accounting_epsilon(q, sigma, steps, delta)
                if eps < 1e-9 or eps > 1e4:
                    continue
                eps_int = dp_accounting_epsilon(q, sigma, steps, delta, INTEGER_ORDERS)
                eps_quad = epsilon_from(DEFAULT_RDP_ORDERS, [steps * r for r in per_order], delta)
                print(f"    ({q}, {sigma}, {steps}, {delta}, [{eps!r}, {eps_int!r}, {eps_quad!r}]),")
print("];")

mp.mp.dps = 40
print("const RDP_BY_QUADRATURE: &[(f64, f64, f64, f64)] = &[")
for q, sigma in [(0.01, 0.6), (0.05, 0.8), (0.2, 0.6), (0.2, 1.1), (0.001, 2.0), (0.05, 5.0)]:
    for alpha in [1.1, 1.3, 1.7, 2.0, 2.5, 4.0, 7.3, 12.0]:
        print(f"    ({q}, {sigma}, {alpha}, {rdp_quadrature(q, sigma, alpha)!r}),")
print("];")
