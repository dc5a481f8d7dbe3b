import math

import pytest
import torch

from timm_energykd.losses import (
    DistillLoss, create_distill_loss, kd_loss_per_sample, list_distill_losses, register_distill_loss,
)


def _kd_reference(s, t, temps):
    """Float64 reference straight from the definition: sum_c p_t (log p_t - log p_s) * T^2."""
    out = []
    for i in range(s.shape[0]):
        T = float(temps[i])
        zs = [float(v) / T for v in s[i]]
        zt = [float(v) / T for v in t[i]]
        ls = math.log(sum(math.exp(v - max(zs)) for v in zs)) + max(zs)
        lt = math.log(sum(math.exp(v - max(zt)) for v in zt)) + max(zt)
        out.append(sum(math.exp(a - lt) * ((a - lt) - (b - ls)) for a, b in zip(zt, zs)) * T * T)
    return torch.tensor(out, dtype=torch.float64)


def test_kd_per_sample_matches_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    temps = torch.tensor([1.0, 2.0, 4.0, 6.0, 0.5])
    got = kd_loss_per_sample(s, t, temps).double()
    torch.testing.assert_close(got, _kd_reference(s, t, temps), rtol=1e-5, atol=1e-6)


def test_registry_roundtrip_and_unknown_name():
    @register_distill_loss('_test_zero')
    class _Zero(DistillLoss):
        def forward(self, student_logits, teacher_logits, target, temperature):
            return student_logits.sum() * 0

    assert '_test_zero' in list_distill_losses()
    assert isinstance(create_distill_loss('_test_zero'), _Zero)
    with pytest.raises(ValueError, match='unknown distillation loss'):
        create_distill_loss('no_such_loss')
