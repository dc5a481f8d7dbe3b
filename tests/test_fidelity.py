"""The paper's rules and the authors' code (Seonghak35/EnergyKD), each against a float64 restatement.

Every rule of docs/FIDELITY.md names its test here (or in test_losses.py for the DKD warm-up). The
restatements are written from the paper's equations and from reading the authors' code
(``mdistiller/engine/utils.py: cal_energy``, ``distillers/energyKD.py``, ``energyDKD.py``, ``energyAUG.py``),
in plain Python floats; no code of theirs is copied and no torch code is shared with the library.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from reference import dkd_row, kd_row
from timm_energykd.energy import EnergyThresholds, calibrate_thresholds, energy_score, threshold_indices
from timm_energykd.mixing import HighEnergyMix, cutmix_box
from timm_energykd.task import EnergyDistillationTask
from timm_energykd.temperature import TwoBinTemperature

C = 6


# ---------------------------------------------------------------------------------------------------------------
# float64 restatements
# ---------------------------------------------------------------------------------------------------------------

def _energy_authors(row, T=4.0):
    """Their energy: -T * log(sum(exp(z / T))), computed exactly as written (exp, sum, log)."""
    return -T * math.log(sum(math.exp(v / T) for v in row))


def _paper_thresholds(energies, r):
    e = sorted(energies)
    n = len(e)
    return e[math.floor(n * r + 1e-9)], e[min(math.floor(n * (1 - r) + 1e-9), n - 1)]


def _authors_thresholds(energies, low_rate, high_rate):
    e = sorted(energies)
    n = len(e)
    return e[int(n * low_rate)], e[-(int(n * high_rate) + 1)]


def _authors_temperatures(energies, low, high, t_low=2.0, t_mid=4.0, t_high=6.0):
    """energyKD.py: E < low -> LOW (2), E > high -> HIGH (6), else MID (4)."""
    return [t_low if e < low else (t_high if e > high else t_mid) for e in energies]


def _paper_temperatures(energies, low, high, base=4.0, t_plus=2.0, t_minus=-2.0):
    """Paper Eq. 9/11 and its text: low-energy (E <= low) get T + T(+), high-energy (E > high) T + T(-)."""
    return [base + t_plus if e <= low else (base + t_minus if e > high else base) for e in energies]


class NoBN(nn.Module):
    """A classifier without BatchNorm: rows do not interact, so one forward on cat([x, mixed]) equals two."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, C))
        self.num_classes, self.in_chans = C, 3
        self.pretrained_cfg = {'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25)}

    def forward(self, x):
        return self.net(x) * 3.0


def _rows(x):
    return x.double().tolist()


# ---------------------------------------------------------------------------------------------------------------
# energy, thresholds, groups, temperatures
# ---------------------------------------------------------------------------------------------------------------

def test_energy_equals_authors_exp_sum_log_where_finite():
    logits = torch.randn(16, C) * 5
    ours = energy_score(logits.to(torch.bfloat16).float())
    ref = [_energy_authors(r) for r in _rows(logits.to(torch.bfloat16).float())]
    torch.testing.assert_close(ours.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-5)
    # where theirs overflows (exp of 1e4 / 4 in float32) ours stays finite
    assert torch.isfinite(energy_score(torch.full((1, C), 1e4)))


@pytest.mark.parametrize('n', [10, 50, 97, 1000])
@pytest.mark.parametrize('r', [0.1, 0.2, 0.3, 0.5])
def test_threshold_indices_and_groups_both_rules(n, r):
    g = torch.Generator().manual_seed(n)
    e = (torch.randn(n, generator=g) * 3 - 10).float()  # float32 values: exact in float64 and on the device
    el = e.double().tolist()
    # paper
    thr = EnergyThresholds.from_energies(e, r)
    assert (thr.low, thr.high) == _paper_thresholds(el, r)
    t = TwoBinTemperature(4.0).forward(e, thr.low, thr.high)
    assert t.tolist() == _paper_temperatures(el, thr.low, thr.high)
    # authors
    athr = EnergyThresholds.from_energies(e, r, rule='authors')
    assert (athr.low, athr.high) == _authors_thresholds(el, r, r) and athr.rule == 'authors'
    ta = TwoBinTemperature(4.0, direction='reverse', rule='authors').forward(e, athr.low, athr.high)
    assert ta.tolist() == _authors_temperatures(el, athr.low, athr.high)
    assert athr.bin_counts['low'] == sum(v < athr.low for v in el)
    assert athr.bin_counts['high'] == sum(v > athr.high for v in el)


def test_authors_groups_differ_by_one_sample_at_whole_n_r():
    e = torch.arange(10, dtype=torch.float64)  # N r = 2 exactly
    assert threshold_indices(10, 0.2) == (2, 8) and threshold_indices(10, 0.2, rule='authors') == (2, 7)
    p = EnergyThresholds.from_energies(e, 0.2)
    a = EnergyThresholds.from_energies(e, 0.2, rule='authors')
    assert (p.bin_counts['low'], p.bin_counts['high']) == (3, 1)   # E <= E[2]; E > E[8]
    assert (a.bin_counts['low'], a.bin_counts['high']) == (2, 2)   # E < E[2]; E > E[7]


def test_calibration_drops_the_last_partial_batch_like_the_authors():
    torch.manual_seed(0)
    logits = torch.randn(20, C) * 3
    loader = [(logits[i:i + 6], None) for i in range(0, 20, 6)]  # 6, 6, 6, 2
    thr = calibrate_thresholds(lambda x: x, loader, 0.2, rule='authors', drop_last=True, progress=False)
    kept = [_energy_authors(r) for r in _rows(logits[:18])]
    low, high = _authors_thresholds(kept, 0.2, 0.2)
    assert thr.num_samples == 18
    assert abs(thr.low - low) < 1e-6 and abs(thr.high - high) < 1e-6
    full, energies = calibrate_thresholds(lambda x: x, loader, 0.2, progress=False, return_energies=True)
    assert full.num_samples == 20 and energies.numel() == 20 and full.rule == 'paper'


def test_task_refuses_thresholds_and_policy_with_different_rules():
    task = EnergyDistillationTask(NoBN(0), NoBN(1), distill_loss='energy_kd', verbose=False,
                                  temperature_policy=TwoBinTemperature(4.0, direction='reverse', rule='authors'))
    with pytest.raises(ValueError, match='rule'):
        task.set_thresholds(EnergyThresholds.from_energies(torch.randn(20), 0.2))


# ---------------------------------------------------------------------------------------------------------------
# Energy KD / Energy DKD with the authors' rules, through the task
# ---------------------------------------------------------------------------------------------------------------

def _authors_task(loss, **kw):
    policy = TwoBinTemperature(4.0, direction='reverse', rule='authors')
    return EnergyDistillationTask(NoBN(0), NoBN(1), distill_loss=loss, temperature_policy=policy, verbose=False,
                                  **kw)


@pytest.mark.parametrize('loss', ['energy_kd', 'energy_dkd'])
def test_authors_energy_kd_and_dkd_losses(loss):
    torch.manual_seed(1)
    x_cal = torch.randn(40, 3, 8, 8)
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, C, (12,))
    kw = dict(task_loss_weight=0.1, distill_loss_weight=0.9) if loss == 'energy_kd' else \
        dict(task_loss_weight=1.0, distill_loss_weight=1.0, distill_loss_kwargs=dict(beta=6.0))
    task = _authors_task(loss, **kw)
    cal_logits = task.teacher_logits(x_cal)
    low, high = _authors_thresholds([_energy_authors(r) for r in _rows(cal_logits)], 0.1, 0.1)
    task.set_thresholds(EnergyThresholds.from_energies(energy_score(cal_logits), 0.1, rule='authors'))
    assert abs(task.thresholds.low - low) < 1e-5 and abs(task.thresholds.high - high) < 1e-5
    task.set_progress(2.5)  # 0-based epoch 2 -> their epoch 3
    out = task(x, y)
    s, t = _rows(out['output'].detach()), _rows(task.teacher_logits(x))
    temps = _authors_temperatures([_energy_authors(r) for r in t], task.thresholds.low, task.thresholds.high)
    if loss == 'energy_kd':
        ref = sum(kd_row(a, b, T) for a, b, T in zip(s, t, temps)) / len(s)
    else:
        ref = min(3 / 20, 1.0) * sum(dkd_row(a, b, int(c), T, 1.0, 6.0)[0]
                                     for a, b, c, T in zip(s, t, y.tolist(), temps)) / len(s)
    assert abs(float(out['kd_loss'].detach()) - ref) < 1e-6
    ce = float(nn.functional.cross_entropy(out['output'].detach().double(), y))
    assert abs(float(out['loss'].detach()) - (kw['task_loss_weight'] * ce + kw['distill_loss_weight'] * ref)) < 1e-5
    assert abs(float(out['frac_low']) - sum(v == 2.0 for v in temps) / 12) < 1e-7
    assert abs(float(out['frac_high']) - sum(v == 6.0 for v in temps) / 12) < 1e-7


# ---------------------------------------------------------------------------------------------------------------
# HE-DA: selection, partner, box, alpha, weight, temperature
# ---------------------------------------------------------------------------------------------------------------

def _authors_box(h, w, lam, rng):
    """energyAUG.py rand_bbox: centre on dim 2 then dim 3; [c - cut // 2, c + cut // 2) clipped."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
    x0, x1 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
    return y0, y1, x0, x1, 1 - (y1 - y0) * (x1 - x0) / (h * w)


@pytest.mark.parametrize('lam', [0.05, 0.3, 0.62, 0.9])
def test_cutmix_box_cut_half_each_side(lam):
    for seed in range(30):
        ours = cutmix_box(9, 11, lam, np.random.default_rng(seed), rule='authors')
        ref = _authors_box(9, 11, lam, np.random.default_rng(seed))
        assert ours[:4] == ref[:4] and abs(ours[4] - ref[4]) < 1e-12
        paper = cutmix_box(9, 11, lam, np.random.default_rng(seed))
        assert paper[1] - paper[0] >= ours[1] - ours[0]  # ours keeps the odd pixel


@pytest.mark.parametrize('mode', ['cutmix', 'mixup'])
def test_authors_he_da_term(mode):
    torch.manual_seed(3)
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, C, (10,))
    mix = HighEnergyMix(mode, rule='authors', generator=np.random.default_rng(7),
                        torch_generator=torch.Generator().manual_seed(7))
    assert mix.alpha == (0.2 if mode == 'mixup' else 1.0)
    task = EnergyDistillationTask(NoBN(0), NoBN(1), distill_loss='kd', temperature=4.0, he_da=mix,
                                  he_da_weight=0.9, he_da_temperature=4.0, task_loss_weight=0.1,
                                  distill_loss_weight=0.9, verbose=False)
    t_logits = task.teacher_logits(x)
    energies = [_energy_authors(r) for r in _rows(t_logits)]
    # HE-DA thresholds with the authors' HIGH_RATE 0.5 on a calibration set (here: this batch)
    he = EnergyThresholds.from_energies(energy_score(t_logits), 0.5, rule='authors')
    _, high = _authors_thresholds(energies, 0.0, 0.5)
    assert abs(he.high - high) < 1e-6
    task.set_thresholds(he, he_da_thresholds=he)
    out = task(x, y)

    # restatement: [0, 1] + {E > high}, randperm partners, lam ~ Beta(alpha), then the box
    sel = [0, 1] + [i for i, e in enumerate(energies) if e > he.high]
    rng = np.random.default_rng(7)
    lam = float(rng.beta(mix.alpha, mix.alpha))
    perm = torch.randperm(len(sel), generator=torch.Generator().manual_seed(7)).tolist()
    imgs, partners = x[sel].double(), x[[sel[p] for p in perm]].double()
    if mode == 'cutmix':
        y0, y1, x0, x1, lam = _authors_box(8, 8, lam, rng)
        mixed = imgs.clone()
        mixed[:, :, y0:y1, x0:x1] = partners[:, :, y0:y1, x0:x1]
    else:
        mixed = lam * imgs + (1 - lam) * partners
    with torch.no_grad():
        s_mix = _rows(task.trainable_module(mixed.float()))
        t_mix = _rows(task.teacher_logits(mixed.float()))
    ref = sum(kd_row(a, b, 4.0) for a, b in zip(s_mix, t_mix)) / len(sel)
    assert abs(float(out['he_da_frac']) - len(sel) / 10) < 1e-7
    assert abs(float(out['he_da_loss'].detach()) - ref) < 1e-6
    main = 0.1 * float(out['task_loss'].detach()) + 0.9 * float(out['kd_loss'].detach())
    assert abs(float(out['loss'].detach()) - (main + 0.9 * ref)) < 1e-5


def test_authors_partner_can_be_itself_paper_never():
    x = torch.randn(12, 3, 4, 4)
    energy = torch.arange(12, dtype=torch.float32)
    selfpairs = 0
    for seed in range(40):
        m = HighEnergyMix('mixup', rule='authors', generator=np.random.default_rng(seed),
                          torch_generator=torch.Generator().manual_seed(seed))(x, energy, 5.5)
        assert m.index.tolist()[:2] == [0, 1] and m.index.tolist()[2:] == list(range(6, 12))
        selfpairs += int((m.index == m.partner).sum())
        p = HighEnergyMix('mixup', generator=np.random.default_rng(seed))(x, energy, 5.5)
        assert not bool((p.index == p.partner).any())
    assert selfpairs > 0
    with pytest.raises(ValueError, match='topk'):
        HighEnergyMix(rule='authors', selection='topk', rate=0.5)


# ---------------------------------------------------------------------------------------------------------------
# recipes: both variants of the paper's CIFAR-100 settings, and the LS repository's settings
# ---------------------------------------------------------------------------------------------------------------

import glob  # noqa: E402
import os  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTHORS = sorted(glob.glob(os.path.join(REPO, 'hparams', 'authors', '*.yaml')))


def _recipe(path, tmp_path):
    from timm_energykd.train.args import parse_args
    from timm_energykd.train.checks import validate_args
    args, _ = parse_args(['--config', path, str(tmp_path)])
    validate_args(args)
    return args


def test_every_paper_recipe_has_an_authors_variant():
    names = {os.path.basename(p) for p in AUTHORS}
    for p in glob.glob(os.path.join(REPO, 'hparams', 'cifar100_*_*_*.yaml')):
        name = os.path.basename(p)
        if '_energy_' in name or name.endswith('_kd_heda.yaml'):
            assert name in names, name


@pytest.mark.parametrize('path', AUTHORS, ids=os.path.basename)
def test_authors_recipes(path, tmp_path):
    """Energy KD / DKD: 360 epochs with six LR decays; HE-DA (energyAUG): 240, KD at T 4, HE-DA weight 0.9."""
    args = _recipe(path, tmp_path)
    assert args.energykd_rules == 'authors'
    assert (args.opt, args.momentum, args.batch_size, args.weight_decay) == ('momentum', 0.9, 64, 5e-4)
    if args.he_da != 'off':
        assert (args.epochs, list(args.decay_milestones)) == (240, [150, 180, 210])
        assert (args.distill_loss, args.kd_temperature, args.task_loss_weight, args.distill_loss_weight) == \
            ('kd', 4.0, 0.1, 0.9)
        assert (args.he_da, args.he_da_alpha, args.he_da_weight, args.he_da_rate) == ('cutmix', 1.0, 0.9, 0.5)
    else:
        assert (args.epochs, list(args.decay_milestones)) == (360, [150, 180, 210, 240, 270, 300])
        assert args.temp_direction == 'reverse' and args.distill_loss in ('energy_kd', 'energy_dkd')
        # the authors' ENERGY rates: 0.3 for ResNet56 -> ResNet20, 0.1 for Energy DKD, else 0.2
        want = 0.3 if 'res56_res20' in path else (0.1 if 'energy_dkd' in path else 0.2)
        assert args.energy_rate == want
    with open(path) as f:
        assert 'Seonghak35/EnergyKD' in f.read()


def test_ls_recipes_use_the_official_repository_settings(tmp_path):
    kd = _recipe(os.path.join(REPO, 'hparams', 'cifar100_res32x4_res8x4_kd_ls.yaml'), tmp_path)
    assert (kd.kd_temperature, kd.distill_loss_weight, kd.task_loss_weight) == (2.0, 9.0, 0.1)
    dkd = _recipe(os.path.join(REPO, 'hparams', 'cifar100_res32x4_res8x4_dkd_ls.yaml'), tmp_path)
    assert (dkd.kd_temperature, dkd.dkd_alpha, dkd.dkd_beta, dkd.task_loss_weight, dkd.distill_loss_weight) == \
        (2.0, 9.0, 72.0, 1.0, 1.0)
    assert dkd.dkd_warmup == 20 and dkd.dkd_warmup_mode == 'mdistiller'


@pytest.mark.usefixtures('one_thread')
def test_trainer_threads_the_authors_rules_and_the_warmup_mode(tmp_path):
    """--energykd-rules authors reaches calibration (index rule, partial batch dropped), the temperature
    policy, HE-DA and the cache identity; --dkd-warmup-mode reaches the loss (no flag accepted and ignored)."""
    from helpers import random_teacher_checkpoint
    from timm_energykd.demo import make_demo_imagefolder
    from timm_energykd.train import trainer
    data = make_demo_imagefolder(tmp_path / 'data', train_per_class=7, val_per_class=2, size=32, num_classes=4)
    ckpt = random_teacher_checkpoint(tmp_path / 't.pth.tar', num_classes=4)
    common = [str(data), '--img-size', '32', '--batch-size', '8', '--workers', '0', '--device', 'cpu',
              '--output', str(tmp_path / 'out'), '--warmup-epochs', '0', '--lr', '0.01', '--epochs', '1',
              '--model', 'test_resnet', '--teacher', 'test_resnet', '--teacher-checkpoint', ckpt]
    r = trainer.main(common + ['--distill-loss', 'energy_dkd', '--energykd-rules', 'authors', '--temp-direction',
                               'reverse', '--dkd-warmup', '1', '--dkd-warmup-mode', 'linear', '--he-da', 'cutmix',
                               '--he-da-rate', '0.5', '--experiment', 'authors'])
    task, thr = r['task'], r['thresholds']
    assert thr.rule == 'authors' and thr.num_samples == 24  # 28 images, batch 8: the partial batch of 4 dropped
    assert thr.identity.get('rule') == 'authors' and task.he_da_thresholds.rule == 'authors'
    assert task.temperature_policy.rule == 'authors' and task.he_da.rule == 'authors'
    assert task.distill_loss.warmup_mode == 'linear' and task.distill_loss.warmup_epochs == 1.0
    p = trainer.main(common + ['--distill-loss', 'energy_kd', '--experiment', 'paper'])
    assert p['thresholds'].rule == 'paper' and p['thresholds'].num_samples == 28
    assert 'rule' not in p['thresholds'].identity and p['task'].he_da is None


def test_fidelity_doc_every_row_names_an_existing_test():
    import ast
    import re
    text = open(os.path.join(REPO, 'docs', 'FIDELITY.md')).read()
    rows = [ln for ln in text.splitlines() if ln.startswith('| ') and not ln.startswith(('| rule', '| setting'))]
    defined = {}
    for f in glob.glob(os.path.join(REPO, 'tests', 'test_*.py')):
        tree = ast.parse(open(f).read())
        defined[os.path.basename(f)] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert len(rows) >= 20
    for row in rows:
        refs = re.findall(r'(?:`(test_\w+\.py))?::(test_\w+)', row)
        assert refs, row
        current = None
        for f, name in refs:
            current = f or current
            assert name in defined[current], (current, name)


@pytest.mark.parametrize('extra,match', [
    (['--calibration', 'batch'], 'calibration dataset'),
    (['--he-da', 'cutmix', '--he-da-selection', 'topk'], 'selects HE-DA samples by threshold'),
])
def test_authors_rules_refuse_what_they_cannot_apply(extra, match, tmp_path):
    from timm_energykd.train.args import parse_args
    from timm_energykd.train.checks import validate_args
    args, _ = parse_args([str(tmp_path), '--model', 'test_resnet', '--teacher', 'test_resnet',
                          '--energykd-rules', 'authors'] + extra)
    with pytest.raises(ValueError, match=match):
        validate_args(args)
