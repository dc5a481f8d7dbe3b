"""Float64 references in plain Python (math module only), shared by the loss tests.

Written from the published formulas, with no torch code shared with the library: one KL, one softmax,
one KD row and one DKD row for every test module.
"""
import math
from typing import List, Sequence


def log_softmax(z: Sequence[float]) -> List[float]:
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def softmax(z: Sequence[float]) -> List[float]:
    return [math.exp(v) for v in log_softmax(z)]


def kl(log_p: Sequence[float], log_q: Sequence[float]) -> float:
    """KL(p || q) from log-probabilities: sum_c p_c (log p_c - log q_c)."""
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))


def kd_row(s: Sequence[float], t: Sequence[float], T: float) -> float:
    """Hinton KD of one sample: KL(softmax(t / T) || softmax(s / T)) * T^2."""
    return kl(log_softmax([v / T for v in t]), log_softmax([v / T for v in s])) * T * T


def dkd_row(s, t, y: int, T: float, alpha: float = 1.0, beta: float = 8.0):
    """DKD of one sample from its definition (Zhao et al. 2022, Eq. 6/7) -> (loss, tckd, nckd, p_t[y])."""
    ps, pt = softmax([v / T for v in s]), softmax([v / T for v in t])
    tckd = pt[y] * math.log(pt[y] / ps[y]) + (1 - pt[y]) * math.log((1 - pt[y]) / (1 - ps[y]))
    nt = [j for j in range(len(s)) if j != y]
    nckd = kl(log_softmax([t[j] / T for j in nt]), log_softmax([s[j] / T for j in nt]))
    return (alpha * tckd + beta * nckd) * T * T, tckd, nckd, pt[y]


def std_row(z: Sequence[float], eps: float = 1e-7) -> List[float]:
    """Logit standardisation with the unbiased (N - 1) std, as the LS authors' code."""
    m = sum(z) / len(z)
    sd = math.sqrt(sum((v - m) ** 2 for v in z) / (len(z) - 1))
    return [(v - m) / (sd + eps) for v in z]


def cos(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def mdistiller_warmup(epoch_1based: int, warmup: float) -> float:
    """mdistiller's DKD factor: ``min(epoch / warmup, 1.0)`` with the trainer's 1-based integer epoch."""
    return min(epoch_1based / warmup, 1.0)
