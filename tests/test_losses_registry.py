import argparse

import pytest
import torch

from reference import kd_row
from timm_energykd.losses import (
    DistillLoss, create_distill_loss, kd_loss_per_sample, list_distill_losses, loss_entries, loss_kwargs_from_args,
    loss_options, register_distill_loss, uses_energy_temperature,
)


def _kd_reference(s, t, temps):
    return torch.tensor([kd_row(s[i].tolist(), t[i].tolist(), float(temps[i])) for i in range(s.shape[0])],
                        dtype=torch.float64)


def test_kd_per_sample_matches_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    temps = torch.tensor([1.0, 2.0, 4.0, 6.0, 0.5])
    got = kd_loss_per_sample(s, t, temps).double()
    torch.testing.assert_close(got, _kd_reference(s, t, temps), rtol=1e-5, atol=1e-6)


def test_registry_roundtrip_and_unknown_name():
    @register_distill_loss('_test_zero', energy_name='_test_energy_zero')
    class _Zero(DistillLoss):
        def per_sample(self, student_logits, teacher_logits, target, temperature, valid=None):
            return student_logits.sum(-1) * 0

    assert '_test_zero' in list_distill_losses()
    assert isinstance(create_distill_loss('_test_zero'), _Zero)
    assert create_distill_loss('_test_energy_zero').uses_energy_temperature
    with pytest.raises(ValueError, match='unknown distillation loss'):
        create_distill_loss('no_such_loss')


def test_per_sample_is_required():
    with pytest.raises(TypeError, match='per_sample'):
        @register_distill_loss('_test_no_per_sample')
        class _NoRows(DistillLoss):
            def forward(self, student_logits, teacher_logits, target, temperature):
                return student_logits.sum() * 0
    assert '_test_no_per_sample' not in list_distill_losses()


def test_every_registered_loss_has_per_sample_rows():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    y = torch.randint(0, 8, (4,), generator=g)
    for name in list_distill_losses():
        if name.startswith('_test'):
            continue
        loss = create_distill_loss(name)
        loss.set_progress(100)
        rows = loss.per_sample(s, t, y, torch.full((4,), 4.0))
        assert rows.shape == (4,), name
        torch.testing.assert_close(rows.mean(), loss(s, t, y, torch.full((4,), 4.0)), msg=name)


def test_energy_names_are_the_same_method_with_energy_temperatures():
    entries = loss_entries()
    for name in ('energy_kd', 'energy_dkd', 'energy_kd_ls', 'energy_wttm', 'energy_r2kd', 'energy_rekd'):
        base = name[len('energy_'):]
        assert entries[name].cls is entries[base].cls
        assert uses_energy_temperature(name) and not uses_energy_temperature(base)


def test_loss_options_are_declared_by_the_loss():
    """The trainer asks the registry which flags a loss takes (no loss-name list outside it)."""
    want = {'dkd_alpha': 'alpha', 'dkd_beta': 'beta', 'dkd_warmup': 'warmup_epochs', 'dkd_warmup_mode': 'warmup_mode'}
    for name in ('dkd', 'energy_dkd', 'dkd_ls'):
        assert loss_options(name) == want
    assert loss_options('kd') == {} and loss_options('wttm') == {}
    args = argparse.Namespace(dkd_alpha=9.0, dkd_beta=72.0, dkd_warmup=1, dkd_warmup_mode='linear', kd_temperature=2)
    kw = loss_kwargs_from_args('dkd_ls', args)
    assert kw == {'alpha': 9.0, 'beta': 72.0, 'warmup_epochs': 1, 'warmup_mode': 'linear'}
    loss = create_distill_loss('dkd_ls', **kw)
    assert (loss.alpha, loss.beta, loss.warmup_epochs, loss.warmup_mode) == (9.0, 72.0, 1.0, 'linear')
    assert loss_kwargs_from_args('kd', args) == {}
    assert loss_kwargs_from_args('dkd', {'dkd_alpha': 2.0}) == {'alpha': 2.0}
