"""Peer losses (issue 7) against independent float64 references written from each paper's formula.

References use plain Python floats (math module) on purpose: no torch code is shared with the library.
Gradients are checked against central finite differences of those references.
"""
import math

import pytest
import torch
import torch.nn as nn

from reference import cos as _cos, dkd_row, mdistiller_warmup, kl as _kl, log_softmax as _log_softmax, std_row as _std_row
from timm_energykd.losses import (
    create_distill_loss, cswt_temperature, kd_loss_per_sample, list_distill_losses, r2kd_loss, rekd_loss_per_sample,
    standardize_logits,
)
from timm_energykd.teacher import BlendedTeacher, make_pruned_teacher

PEER_NAMES = ['kd_ls', 'dkd_ls', 'energy_kd_ls', 'wttm', 'energy_wttm', 'r2kd', 'energy_r2kd', 'rekd',
              'energy_rekd', 'cskd']
ENERGY_NAMES = {'energy_kd_ls', 'energy_wttm', 'energy_r2kd', 'energy_rekd'}


def _names():
    return list(PEER_NAMES)


# ---------------------------------------------------------------------------------------------------------------
# plain-Python float64 helpers
# ---------------------------------------------------------------------------------------------------------------

def _rows(x):
    return [[float(v) for v in row] for row in x.double().tolist()]






def _kd_ls_ref(S, Tt, temps):
    out = 0.0
    for s, t, T in zip(S, Tt, temps):
        out += _kl(_log_softmax([v / T for v in _std_row(t)]), _log_softmax([v / T for v in _std_row(s)])) * T * T
    return out / len(S)


def _wttm_ref(S, Tt, gammas):
    out = 0.0
    for s, t, g in zip(S, Tt, gammas):
        p = [math.exp(v) for v in _log_softmax(t)]
        u = sum(v ** g for v in p)
        log_hat = [math.log(v ** g / u) for v in p]
        out += u * _kl(log_hat, _log_softmax(s))
    return out / len(S)


def _dkd_ref(S, Tt, y, temps, alpha=1.0, beta=8.0):
    return sum(dkd_row(s, t, c, T, alpha, beta)[0] for s, t, c, T in zip(S, Tt, y, temps)) / len(S)


def _ranks(v):
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    for pos, i in enumerate(order):
        r[i] = pos + 1.0
    return r


def _soft_ranks(v, tau):
    return [0.5 + sum(1.0 / (1.0 + math.exp(-(a - b) / tau)) for b in v) for a in v]


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    return _cos([x - ma for x in a], [y - mb for y in b])


def _r2kd_ref(S, Tt, temps, value_weight=2.0, rank_weight=2.0, metric='abs_cosine', rank='soft', tau=0.1):
    B, C = len(S), len(S[0])
    lps = [_log_softmax([v / T for v in s]) for s, T in zip(S, temps)]
    lpt = [_log_softmax([v / T for v in t]) for t, T in zip(Tt, temps)]
    ps = [[math.exp(v) for v in r] for r in lps]
    pt = [[math.exp(v) for v in r] for r in lpt]
    sim = (lambda a, b: abs(_cos(a, b))) if metric == 'abs_cosine' else _pearson
    sample = sum(T * T * (1 - sim(a, b)) for a, b, T in zip(ps, pt, temps)) / B
    cols = sum(sim([ps[i][c] for i in range(B)], [pt[i][c] for i in range(B)]) for c in range(C)) / C
    mean_t2 = sum(T * T for T in temps) / B
    loss = value_weight * (sample + mean_t2 * (1 - cols))
    if rank != 'none':
        sp = 0.0
        for a, b in zip(lps, lpt):
            ra = _soft_ranks(a, tau) if rank == 'soft' else _ranks(a)
            sp += _pearson(ra, _ranks(b))
        loss += rank_weight * (1 - sp / B)
    return loss


def _rekd_ref(S, Tt, y, temps, k, wt=1.0, wn=1.0, wg=1.0, decoupled=True):
    out = 0.0
    for s, t, c, T in zip(S, Tt, y, temps):
        C = len(s)
        zs, zt = [v / T for v in s], [v / T for v in t]
        non_target = sorted((j for j in range(C) if j != c), key=lambda j: -zt[j])
        top, rest = non_target[:k], non_target[k:]
        ps = [math.exp(v) for v in _log_softmax(zs)]
        pt = [math.exp(v) for v in _log_softmax(zt)]
        bs = [ps[c], sum(ps[j] for j in top), sum(ps[j] for j in rest)]
        bt = [pt[c], sum(pt[j] for j in top), sum(pt[j] for j in rest)]
        group = sum(a * math.log(a / b) for a, b in zip(bt, bs))
        tisd = _kl(_log_softmax([zt[j] for j in top]), _log_softmax([zs[j] for j in top]))
        ntid = _kl(_log_softmax([zt[j] for j in rest]), _log_softmax([zs[j] for j in rest]))
        mt, mr = (1.0, 1.0) if decoupled else (bt[1], bt[2])
        out += (wg * group + wt * mt * tisd + wn * mr * ntid) * T * T
    return out / len(S)


def _cswt_ref(S, Tt, t_min, t_max):
    cs = [_cos([math.exp(v) for v in _log_softmax(s)], [math.exp(v) for v in _log_softmax(t)]) for s, t in zip(S, Tt)]
    hi, lo = max(cs), min(cs)
    return [t_min + (t_max - t_min) * (hi - c) / (hi - lo) for c in cs]


def _class_cos_dist(S, Tt, temps):
    ps = [[math.exp(v) for v in _log_softmax([x / T for x in s])] for s, T in zip(S, temps)]
    pt = [[math.exp(v) for v in _log_softmax([x / T for x in t])] for t, T in zip(Tt, temps)]
    B, C = len(S), len(S[0])
    return sum(1 - _cos([ps[i][c] for i in range(B)], [pt[i][c] for i in range(B)]) for c in range(C)) / C


def _cskd_ref(S, Tt, temps, t_min=2.0, t_max=6.0, wf=2.0, wc=2.0, cswt=None):
    # cswt: the CSWT temperatures, fixed from outside for finite differences (they carry no gradient)
    cswt = cswt if cswt is not None else _cswt_ref(S, Tt, t_min, t_max)
    B = len(S)
    fixed = wf * sum(T * T for T in temps) / B * _class_cos_dist(S, Tt, temps)
    weighted = wc * sum(T * T for T in cswt) / B * _class_cos_dist(S, Tt, cswt)
    return fixed + weighted


def _finite_diff(fn, S, h=1e-5):
    grad = []
    for i in range(len(S)):
        row = []
        for j in range(len(S[0])):
            up = [r[:] for r in S]
            dn = [r[:] for r in S]
            up[i][j] += h
            dn[i][j] -= h
            row.append((fn(up) - fn(dn)) / (2 * h))
        grad.append(row)
    return torch.tensor(grad, dtype=torch.float64)


def _data(b=5, c=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g) * scale
    t = torch.randn(b, c, generator=g) * scale
    y = torch.randint(0, c, (b,), generator=g)
    temps = torch.tensor([1.0, 2.0, 4.0, 6.0, 3.0])[:b]
    return s, t, y, temps


def _close(got, ref, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64),
                               rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------

def test_all_peer_losses_registered():
    names = list_distill_losses()
    for n in PEER_NAMES:
        assert n in names
    for n in PEER_NAMES:
        assert create_distill_loss(n).uses_energy_temperature == (n in ENERGY_NAMES)


# ---------------------------------------------------------------------------------------------------------------
# logit standardisation
# ---------------------------------------------------------------------------------------------------------------

def test_standardize_logits_matches_reference():
    s, _, _, _ = _data()
    _close(standardize_logits(s), [_std_row(r) for r in _rows(s)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['kd_ls', 'energy_kd_ls'])
def test_kd_ls_value_and_grad(name):
    s, t, y, temps = _data()
    S, Tt, tl = _rows(s), _rows(t), temps.tolist()
    s = s.clone().requires_grad_(True)
    loss = create_distill_loss(name)(s, t, y, temps)
    _close(loss.item(), _kd_ls_ref(S, Tt, tl))
    loss.backward()
    _close(s.grad, _finite_diff(lambda x: _kd_ls_ref(x, Tt, tl), S), rtol=1e-3, atol=1e-5)
    # scalar temperature: paper's T 2
    _close(create_distill_loss(name)(s, t, y, 2.0).item(), _kd_ls_ref(S, Tt, [2.0] * len(S)))


def test_kd_ls_is_invariant_to_logit_shift_and_scale():
    s, t, y, _ = _data()
    loss = create_distill_loss('kd_ls')
    _close(loss(s, t, y, 2.0).item(), loss(3 * s + 5, 0.5 * t - 2, y, 2.0).item(), rtol=1e-4, atol=1e-5)


def test_dkd_ls_value_and_warmup():
    s, t, y, temps = _data()
    S, Tt = _rows(s), _rows(t)
    std_s, std_t = [_std_row(r) for r in S], [_std_row(r) for r in Tt]
    loss = create_distill_loss('dkd_ls', warmup_epochs=0)
    _close(loss(s, t, y, temps).item(), _dkd_ref(std_s, std_t, y.tolist(), temps.tolist()), rtol=1e-4, atol=1e-4)
    # DKD+LS is DKD on standardised logits: the warm-up is DKD's own (mdistiller's rule by default)
    from timm_energykd.losses import DKDLoss
    warm = create_distill_loss('dkd_ls', warmup_epochs=20)
    assert isinstance(warm, DKDLoss) and warm.warmup_mode == 'mdistiller'
    warm.set_progress(5.5)  # 0-based epoch 5 -> mdistiller's epoch 6
    ref = mdistiller_warmup(6, 20) * _dkd_ref(std_s, std_t, y.tolist(), [4.0] * 5)
    _close(warm(s, t, y, 4.0).item(), ref, rtol=1e-4, atol=1e-4)
    lin = create_distill_loss('dkd_ls', warmup_epochs=20, warmup_mode='linear')
    lin.set_progress(5)
    _close(lin(s, t, y, 4.0).item(), 0.25 * _dkd_ref(std_s, std_t, y.tolist(), [4.0] * 5), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# WTTM
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['wttm', 'energy_wttm'])
def test_wttm_value_and_grad(name):
    s, t, y, temps = _data()
    S, Tt, gammas = _rows(s), _rows(t), [1.0 / v for v in temps.tolist()]
    s = s.clone().requires_grad_(True)
    loss = create_distill_loss(name)(s, t, y, temps)
    _close(loss.item(), _wttm_ref(S, Tt, gammas))
    loss.backward()
    _close(s.grad, _finite_diff(lambda x: _wttm_ref(x, Tt, gammas), S), rtol=1e-3, atol=1e-5)


def test_wttm_fixed_gamma_and_unweighted():
    s, t, y, _ = _data()
    S, Tt = _rows(s), _rows(t)
    _close(create_distill_loss('wttm', gamma=0.1)(s, t, y, 4.0).item(), _wttm_ref(S, Tt, [0.1] * 5))
    ttm = create_distill_loss('wttm', weighted=False)(s, t, y, 4.0).item()
    ref = sum(_kl(_log_softmax([v / 4 for v in b]), _log_softmax(a)) for a, b in zip(S, Tt)) / 5
    _close(ttm, ref)
    with pytest.raises(ValueError, match='gamma'):
        create_distill_loss('wttm', gamma=2.0)
    with pytest.raises(ValueError, match='ignored'):  # a fixed power would silently drop the energy temperatures
        create_distill_loss('energy_wttm', gamma=0.5)


# ---------------------------------------------------------------------------------------------------------------
# R2KD
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('metric', ['abs_cosine', 'pearson'])
@pytest.mark.parametrize('rank', ['soft', 'hard', 'none'])
def test_r2kd_value(metric, rank):
    s, t, y, temps = _data()
    loss = create_distill_loss('energy_r2kd', value_metric=metric, rank_mode=rank)(s, t, y, temps)
    _close(loss.item(), _r2kd_ref(_rows(s), _rows(t), temps.tolist(), metric=metric, rank=rank))
    scalar = create_distill_loss('r2kd', value_metric=metric, rank_mode=rank)(s, t, y, 4.0)
    _close(scalar.item(), _r2kd_ref(_rows(s), _rows(t), [4.0] * 5, metric=metric, rank=rank))


def test_r2kd_soft_rank_grad_and_limit():
    s, t, y, temps = _data()
    S, Tt, tl = _rows(s), _rows(t), temps.tolist()
    s = s.clone().requires_grad_(True)
    loss = create_distill_loss('r2kd', rank_tau=0.5)(s, t, y, temps)
    loss.backward()
    _close(s.grad, _finite_diff(lambda x: _r2kd_ref(x, Tt, tl, tau=0.5), S), rtol=1e-3, atol=1e-5)
    # the published argsort rank term gives no gradient; the soft one tends to it as tau -> 0
    s2 = s.detach().clone().requires_grad_(True)
    hard_only = r2kd_loss(s2, t, 4.0, value_weight=0.0, rank_mode='hard')
    if hard_only.requires_grad:  # only through the zero-weighted value term
        g = torch.autograd.grad(hard_only, s2, allow_unused=True)[0]
        assert g is None or not g.any()
    _close(r2kd_loss(s, t, 4.0, value_weight=0.0, rank_tau=1e-4).item(), hard_only.item(), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# ReKD
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('decoupled', [True, False])
def test_rekd_value_and_grad(decoupled):
    s, t, y, temps = _data()
    S, Tt, yl, tl = _rows(s), _rows(t), y.tolist(), temps.tolist()
    s = s.clone().requires_grad_(True)
    kw = dict(k=3, tisd_weight=2.0, ntid_weight=0.5, group_weight=1.5, decoupled=decoupled)
    loss = create_distill_loss('energy_rekd', **kw)(s, t, y, temps)
    ref = lambda x: _rekd_ref(x, Tt, yl, tl, 3, 2.0, 0.5, 1.5, decoupled)
    _close(loss.item(), ref(S))
    loss.backward()
    _close(s.grad, _finite_diff(ref, S), rtol=1e-3, atol=1e-5)


def test_rekd_mass_weighted_equals_kd_and_soft_targets():
    s, t, y, temps = _data()
    got = rekd_loss_per_sample(s, t, y, temps, k=2, decoupled=False)
    torch.testing.assert_close(got, kd_loss_per_sample(s, t, temps), rtol=1e-4, atol=1e-5)
    soft = torch.nn.functional.one_hot(y, 7).float() * 0.9 + 0.1 / 7
    loss = create_distill_loss('rekd', k=2)
    torch.testing.assert_close(loss(s, t, soft, 4.0), loss(s, t, y, 4.0))
    with pytest.raises(ValueError, match='k must be'):
        loss_bad = create_distill_loss('rekd', k=6)
        loss_bad(s, t, y, 4.0)


# ---------------------------------------------------------------------------------------------------------------
# CSKD
# ---------------------------------------------------------------------------------------------------------------

def test_cskd_value_and_grad():
    s, t, y, _ = _data()
    S, Tt = _rows(s), _rows(t)
    cswt = _cswt_ref(S, Tt, 2.0, 6.0)
    s = s.clone().requires_grad_(True)
    loss = create_distill_loss('cskd')(s, t, y, 4.0)
    _close(loss.item(), _cskd_ref(S, Tt, [4.0] * 5))
    loss.backward()
    _close(s.grad, _finite_diff(lambda x: _cskd_ref(x, Tt, [4.0] * 5, cswt=cswt), S), rtol=1e-3, atol=1e-5)


def test_cskd_per_sample_temperature_and_cswt_direction():
    s, t, y, temps = _data()
    loss = create_distill_loss('cskd', t_min=1.0, t_max=5.0, fixed_weight=1.0, cswt_weight=0.5)
    _close(loss(s, t, y, temps).item(), _cskd_ref(_rows(s), _rows(t), temps.tolist(), 1.0, 5.0, 1.0, 0.5))
    tw = cswt_temperature(s, t, 2.0, 6.0)
    ref = torch.tensor(_cswt_ref(_rows(s), _rows(t), 2.0, 6.0))
    _close(tw, ref)
    # agreement -> low temperature: a student equal to the teacher on sample 0 gets t_min there
    s_agree = s.clone()
    s_agree[0] = t[0]
    assert cswt_temperature(s_agree, t)[0].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match='t_min'):
        create_distill_loss('cskd', t_min=5.0, t_max=1.0)


# ---------------------------------------------------------------------------------------------------------------
# robustness: per-sample temperatures, huge logits, half precision
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', _names())
def test_finite_with_large_logits(name):
    s, t, y, temps = _data(b=5, c=7, seed=1, scale=1e4)
    s = s.requires_grad_(True)
    loss = create_distill_loss(name)(s, t, y, temps)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('name', _names())
def test_half_precision_inputs(name, dtype):
    s, t, y, temps = _data(seed=2)
    s_h, t_h = s.to(dtype), t.to(dtype)
    loss = create_distill_loss(name)
    out = loss(s_h, t_h, y, temps)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    _close(out.item(), loss(s_h.float(), t_h.float(), y, temps).item(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# pruned / blended teacher (R2KD)
# ---------------------------------------------------------------------------------------------------------------

def _tiny_teacher():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()


def test_make_pruned_teacher_prunes_each_layer_and_keeps_original():
    teacher = _tiny_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruned = make_pruned_teacher(teacher, amount=0.1)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(pruned.state_dict()) == set(before)  # prune.remove left plain weights, no *_orig / *_mask
    layers = [m for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 3
    for m in layers:
        n = m.weight.numel()
        assert int((m.weight == 0).sum()) == round(0.1 * n)
        assert not m.weight.requires_grad
    # the zeroed entries are the smallest-magnitude ones of the original layer
    orig = teacher[0].weight.detach().abs().flatten()
    zeroed = (pruned[0].weight == 0).flatten()
    assert orig[zeroed].max() <= orig[~zeroed].min()
    with pytest.raises(ValueError, match='amount'):
        make_pruned_teacher(teacher, amount=1.0)


def test_blended_teacher_mixes_logits():
    teacher = _tiny_teacher()
    blended = BlendedTeacher(teacher).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = 0.7 * teacher(x) + 0.3 * blended.pruned_teacher(x)
        torch.testing.assert_close(blended(x), expected)
        assert not torch.allclose(blended(x), teacher(x))
    blended.train()
    assert not blended.teacher.training and not blended.pruned_teacher.training
    custom = BlendedTeacher(teacher, pruned_teacher=teacher, teacher_weight=0.2)
    with torch.no_grad():
        torch.testing.assert_close(custom(x), teacher(x))


# ---------------------------------------------------------------------------------------------------------------
# per_sample with a row mask: the batch terms use the valid rows only
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,ref', [
    ('energy_r2kd', lambda S, Tt, y, T: _r2kd_ref(S, Tt, T)),
    ('energy_r2kd_pearson', lambda S, Tt, y, T: _r2kd_ref(S, Tt, T, metric='pearson')),
    ('cskd', lambda S, Tt, y, T: _cskd_ref(S, Tt, T)),
    ('energy_rekd', lambda S, Tt, y, T: _rekd_ref(S, Tt, y, T, 3)),
    ('energy_kd_ls', lambda S, Tt, y, T: _kd_ls_ref(S, Tt, T)),
])
def test_masked_per_sample_equals_reference_on_valid_rows(name, ref):
    s, t, y, temps = _data(b=5)
    kwargs = {'value_metric': 'pearson'} if name.endswith('_pearson') else ({'k': 3} if 'rekd' in name else {})
    loss = create_distill_loss(name.replace('_pearson', ''), **kwargs)
    valid = torch.tensor([True, False, True, True, False])
    rows = loss.per_sample(s, t, y, temps, valid=valid)
    got = (rows * valid).sum() / valid.sum()
    keep = [i for i in range(5) if valid[i]]
    S, Tt = [_rows(s)[i] for i in keep], [_rows(t)[i] for i in keep]
    _close(got.item(), ref(S, Tt, [int(y[i]) for i in keep], [float(temps[i]) for i in keep]))
    # no mask: the batch mean of per_sample is the loss
    _close(loss.per_sample(s, t, y, temps).mean().item(), loss(s, t, y, temps).item(), rtol=1e-6, atol=1e-7)


def test_cskd_has_no_energy_variant():
    assert 'energy_cskd' not in list_distill_losses()
    with pytest.raises(ValueError, match='own per-sample temperatures'):
        create_distill_loss('cskd', temperature_source='energy')
