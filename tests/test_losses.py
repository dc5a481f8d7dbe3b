import pytest
import torch

from reference import dkd_row as _dkd_ref_row, kd_row as _kd_ref_row, mdistiller_warmup
from timm_energykd.losses import (
    DKDLoss, EnergyDKDLoss, EnergyKDLoss, KDLoss, create_distill_loss, dkd_loss_per_sample, dkd_warmup_factor,
    kd_loss_per_sample,
)


def _rand(b=6, c=9, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * scale, torch.randn(b, c, generator=g) * scale, \
        torch.randint(0, c, (b,), generator=g)


def test_kd_gradient_matches_float64_finite_differences():
    s, t, _ = _rand(4, 5)
    temps = torch.tensor([1.0, 2.0, 4.0, 6.0])
    s_req = s.clone().requires_grad_(True)
    kd_loss_per_sample(s_req, t, temps).sum().backward()
    h = 1e-6
    ref = torch.zeros(4, 5, dtype=torch.float64)
    for i in range(4):
        for j in range(5):
            sp, sm = s[i].double().tolist(), s[i].double().tolist()
            sp[j] += h
            sm[j] -= h
            T = float(temps[i])
            ref[i, j] = (_kd_ref_row(sp, t[i].tolist(), T) - _kd_ref_row(sm, t[i].tolist(), T)) / (2 * h)
    torch.testing.assert_close(s_req.grad.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('alpha,beta', [(1.0, 8.0), (0.5, 2.0)])
def test_dkd_matches_reference(alpha, beta):
    s, t, y = _rand()
    temps = torch.tensor([1.0, 2.0, 4.0, 6.0, 0.5, 3.0])
    got = dkd_loss_per_sample(s, t, y, temps, alpha, beta).double()
    ref = torch.tensor([_dkd_ref_row(s[i].tolist(), t[i].tolist(), int(y[i]), float(temps[i]), alpha, beta)[0]
                        for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_dkd_decomposition_identity():
    """KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD (DKD paper, Eq. 6)."""
    s, t, y = _rand(seed=2)
    T = 2.0
    tckd = dkd_loss_per_sample(s, t, y, T, alpha=1.0, beta=0.0) / T ** 2
    nckd = dkd_loss_per_sample(s, t, y, T, alpha=0.0, beta=1.0) / T ** 2
    pt_gt = torch.softmax(t.double() / T, -1).gather(1, y[:, None]).squeeze(1)
    kl = kd_loss_per_sample(s, t, T).double() / T ** 2
    torch.testing.assert_close(tckd.double() + (1 - pt_gt) * nckd.double(), kl, rtol=1e-5, atol=1e-6)


def test_dkd_gradient_matches_finite_differences():
    s, t, y = _rand(3, 4, seed=4)
    temps = torch.tensor([1.0, 3.0, 5.0])
    s_req = s.clone().requires_grad_(True)
    dkd_loss_per_sample(s_req, t, y, temps, 1.0, 8.0).sum().backward()
    h = 1e-6
    ref = torch.zeros(3, 4, dtype=torch.float64)
    for i in range(3):
        for j in range(4):
            sp, sm = s[i].double().tolist(), s[i].double().tolist()
            sp[j] += h
            sm[j] -= h
            args = (t[i].tolist(), int(y[i]), float(temps[i]), 1.0, 8.0)
            ref[i, j] = (_dkd_ref_row(sp, *args)[0] - _dkd_ref_row(sm, *args)[0]) / (2 * h)
    torch.testing.assert_close(s_req.grad.double(), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('name', ['kd', 'energy_kd', 'dkd', 'energy_dkd'])
def test_huge_logits_bf16_autocast_and_fp16_finite(name):
    loss_fn = create_distill_loss(name)
    loss_fn.set_progress(100)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(4, 10, generator=g) * 1e4).requires_grad_(True)
    t = torch.randn(4, 10, generator=g) * 1e4
    y = torch.randint(0, 10, (4,), generator=g)
    temps = torch.tensor([2.0, 4.0, 6.0, 4.0])
    w = torch.nn.Linear(10, 10)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = loss_fn(w(s), t, y, temps)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all() and torch.isfinite(w.weight.grad).all()
    # fp16 inputs near the fp16 maximum (65504)
    s16 = (torch.randn(4, 10, generator=g) * 3e4).clamp(-6e4, 6e4).half().requires_grad_(True)
    out = loss_fn(s16, (t * 3).clamp(-6e4, 6e4).half(), y, temps)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s16.grad).all()


def test_dkd_two_classes_finite():
    s = torch.tensor([[50.0, -50.0], [0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[80.0, -80.0], [3.0, 0.0]])
    out = dkd_loss_per_sample(s, t, torch.tensor([0, 1]), 4.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()


def test_registry_classes_and_flags():
    kd, ekd = create_distill_loss('kd'), create_distill_loss('energy_kd')
    assert type(kd) is KDLoss and type(ekd) is KDLoss  # one class per method; the name picks the temperature source
    assert not kd.uses_energy_temperature and ekd.uses_energy_temperature
    assert EnergyKDLoss().uses_energy_temperature and EnergyDKDLoss().uses_energy_temperature
    d = create_distill_loss('dkd')
    assert isinstance(d, DKDLoss) and (d.alpha, d.beta, d.warmup_epochs, d.warmup_mode) == (1.0, 8.0, 20.0, 'mdistiller')
    assert not d.uses_energy_temperature and create_distill_loss('energy_dkd').uses_energy_temperature
    with pytest.raises(ValueError, match='contradicts'):
        create_distill_loss('energy_kd', temperature_source='fixed')


@pytest.mark.parametrize('warmup', [1, 20])
@pytest.mark.parametrize('steps', [1, 7])
def test_dkd_warmup_equals_mdistiller_at_every_step(warmup, steps):
    """mdistiller: ``min(epoch / W, 1)``, integer epoch from 1; the task sends ``epoch + step / steps`` (0-based)."""
    s, t, y = _rand()
    full = dkd_loss_per_sample(s, t, y, 4.0).mean()
    loss_fn = DKDLoss(warmup_epochs=warmup)
    # before any set_progress call the loss is at the first step of epoch 1
    assert loss_fn.warmup_factor == mdistiller_warmup(1, warmup)
    for epoch in range(warmup + 1):
        for step in range(steps):
            loss_fn.set_progress(epoch + step / steps)
            want = mdistiller_warmup(epoch + 1, warmup)
            assert loss_fn.warmup_factor == want, (epoch, step)
            torch.testing.assert_close(loss_fn(s, t, y, 4.0), want * full, rtol=1e-6, atol=1e-7)
    if warmup == 1:  # the ImageNet Energy DKD recipes: the full DKD term from the first step
        loss_fn.set_progress(0.0)
        assert loss_fn.warmup_factor == 1.0


def test_dkd_linear_warmup_option_and_soft_targets():
    s, t, y = _rand()
    loss_fn = DKDLoss(warmup_epochs=20, warmup_mode='linear')
    full = dkd_loss_per_sample(s, t, y, 4.0).mean()
    assert float(loss_fn(s, t, y, 4.0)) == 0.0
    loss_fn.set_progress(5)
    torch.testing.assert_close(loss_fn(s, t, y, 4.0), 0.25 * full)
    loss_fn.set_progress(40)
    torch.testing.assert_close(loss_fn(s, t, y, 4.0), full)
    soft = torch.nn.functional.one_hot(y, 9).float() * 0.9 + 0.1 / 9
    torch.testing.assert_close(loss_fn(s, t, soft, 4.0), full)
    assert float(DKDLoss(warmup_epochs=0)(s, t, y, 4.0)) == pytest.approx(float(full))
    assert dkd_warmup_factor(3.5, 0, 'linear') == 1.0
    with pytest.raises(ValueError, match='warmup_mode'):
        DKDLoss(warmup_mode='cosine')


def test_kd_loss_is_batch_mean_of_per_sample():
    s, t, y = _rand()
    temps = torch.linspace(1, 6, 6)
    torch.testing.assert_close(KDLoss()(s, t, y, temps), kd_loss_per_sample(s, t, temps).mean())
