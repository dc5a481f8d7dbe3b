import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.task import LogitDistillationTask

from timm_energykd.energy import EnergyThresholds, calibrate_thresholds, energy_score
from timm_energykd.losses import kd_loss_per_sample
from timm_energykd.mixing import HighEnergyMix
from timm_energykd.task import EnergyDistillationTask
from timm_energykd.temperature import GradedTemperature

NUM_CLASSES = 5


class Tiny(nn.Module):
    """A tiny classifier with the attributes timm's tasks read."""

    def __init__(self, seed, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), width=8):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, NUM_CLASSES))
        self.num_classes, self.in_chans = NUM_CLASSES, 3
        self.pretrained_cfg = {'mean': mean, 'std': std}

    def forward(self, x):
        return self.net(x)


def _batch(b=8, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, hw, hw, generator=g), torch.randint(0, NUM_CLASSES, (b,), generator=g)


def _thresholds(task, x, rate=0.2, num_bins=10):
    return EnergyThresholds.from_energies(energy_score(task.teacher_logits(x)), rate, num_bins=num_bins)


def _task(**kw):
    kw.setdefault('verbose', False)
    return EnergyDistillationTask(Tiny(0), Tiny(1, mean=(0.4, 0.4, 0.4), std=(0.3, 0.3, 0.3)), **kw)


def test_parity_with_timm_logit_distillation():
    x, y = _batch()
    student, teacher = Tiny(0), Tiny(1, mean=(0.4, 0.4, 0.4), std=(0.3, 0.3, 0.3))
    ref = LogitDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), temperature=4.0,
                                task_loss_weight=0.3, verbose=False)
    ours = EnergyDistillationTask(student, teacher, distill_loss='kd', temperature=4.0, task_loss_weight=0.3,
                                  verbose=False)
    ref.train(), ours.train()
    torch.manual_seed(0)
    r = ref(x, y)
    o = ours(x, y)
    for k in ('loss', 'task_loss', 'kd_loss'):
        torch.testing.assert_close(o[k], r[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o['output'], r['output'])
    assert float(o['temp_mean']) == 4.0 and float(o['teacher_nonfinite']) == 0.0
    assert all(v.ndim == 0 for k, v in o.items() if k != 'output')


@pytest.mark.parametrize('dw,tw', [(None, None), (0.7, None), (None, 0.3), (2.0, 0.5)])
def test_weighting_matches_logit_distillation_task(dw, tw):
    ref = LogitDistillationTask(Tiny(0), Tiny(1), distill_loss_weight=dw, task_loss_weight=tw, verbose=False)
    ours = _task(distill_loss='kd', distill_loss_weight=dw, task_loss_weight=tw)
    assert (ours.distill_loss_weight, ours.task_loss_weight) == (ref.distill_loss_weight, ref.task_loss_weight)
    x, y = _batch()
    o = ours(x, y)
    expected = ours.task_loss_weight * o['task_loss'] + ours.distill_loss_weight * o['kd_loss']
    torch.testing.assert_close(o['loss'], expected)


def test_energy_kd_uses_per_sample_temperatures_against_reference():
    x, y = _batch(10)
    task = _task(distill_loss='energy_kd', task_loss_weight=0.1)
    thr = _thresholds(task, x)
    task.set_thresholds(thr)
    o = task(x, y)
    t_logits = task.teacher_logits(x)
    e = energy_score(t_logits)
    temps = torch.where(e <= thr.low, 6.0, torch.where(e > thr.high, 2.0, 4.0))
    assert float((temps == 6.0).float().mean()) == pytest.approx(0.3)  # N=10, r=0.2: indices 0..2 -> E<=low
    ref = kd_loss_per_sample(o['output'], t_logits, temps).mean()
    torch.testing.assert_close(o['kd_loss'], ref)
    torch.testing.assert_close(o['temp_mean'], temps.mean())
    assert float(o['frac_low']) == pytest.approx(0.3) and float(o['frac_high']) == pytest.approx(0.1)


def test_plain_loss_needs_no_temperature_policy():
    task = _task(distill_loss='kd', temperature=2.0)  # T + T(-) = 0 would be an invalid two-bin policy
    assert task.temperature_policy is None
    x, y = _batch()
    task.set_thresholds(_thresholds(task, x))
    out = task(x, y)
    assert out['temp_mean'].item() == 2.0
    ref = kd_loss_per_sample(out['output'].detach(), task.teacher_logits(x), 2.0).mean()
    torch.testing.assert_close(out['kd_loss'].detach(), ref)


def test_dataset_mode_requires_thresholds_for_energy_loss():
    with pytest.raises(RuntimeError, match='set_thresholds'):
        _task(distill_loss='energy_kd')(*_batch())


def test_bad_arguments():
    with pytest.raises(ValueError, match='threshold_mode'):
        _task(threshold_mode='epoch')
    with pytest.raises(ValueError, match='energy_rate'):
        _task(energy_rate=0.7)
    with pytest.raises(ValueError, match='unknown distillation loss'):
        _task(distill_loss='nope')
    task = _task(temperature_policy=GradedTemperature(num_bins=4))
    with pytest.raises(ValueError, match='num_bins=4'):
        task.set_thresholds(EnergyThresholds.from_energies(torch.arange(20.), 0.2, num_bins=10))


def test_nonfinite_teacher_rows_masked_without_nan():
    x, y = _batch(6)
    task = _task(distill_loss='energy_dkd', threshold_mode='batch')
    task.set_progress(100)
    real = task.teacher.model.forward

    def bad_forward(inp):
        out = real(inp).clone()
        out[1, 2] = float('nan')
        out[4, 0] = float('inf')
        return out
    task.teacher.model.forward = bad_forward
    o = task(x, y)
    o['loss'].backward()
    assert float(o['teacher_nonfinite']) == 2.0
    assert all(torch.isfinite(v).all() for v in o.values())
    assert all(torch.isfinite(p.grad).all() for p in task.trainable_module.parameters())
    # masked mean equals the loss over the valid rows only
    keep = torch.tensor([0, 2, 3, 5])
    t_logits = real(task.teacher.normalize_input(x, task.student_mean, task.student_std)).detach()
    e = energy_score(torch.where(torch.isfinite(bad_forward(
        task.teacher.normalize_input(x, task.student_mean, task.student_std))).all(1, keepdim=True), t_logits, 0.))
    temps = task.temperature_policy(e, *task.threshold_estimator(e)[:2])
    ref = task.distill_loss.per_sample(o['output'][keep], t_logits[keep], y[keep], temps[keep]).mean()
    torch.testing.assert_close(o['kd_loss'], ref)


def test_bf16_autocast_huge_logits_finite():
    class Huge(Tiny):
        def forward(self, x):
            return super().forward(x) * 1e4
    task = EnergyDistillationTask(Huge(0), Huge(1), distill_loss='energy_kd', threshold_mode='running', verbose=False)
    x, y = _batch()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        o = task(x, y)
    o['loss'].backward()
    assert torch.isfinite(o['loss']) and all(torch.isfinite(p.grad).all() for p in task.trainable_module.parameters())


@pytest.mark.parametrize('selection', ['threshold', 'topk'])
def test_he_da_single_student_forward_and_output_rows(selection):
    x, y = _batch(8)
    mix = HighEnergyMix('cutmix', selection=selection, rate=0.5, generator=np.random.default_rng(0))
    task = _task(distill_loss='energy_kd', he_da=mix, he_da_weight=0.5)
    task.set_thresholds(_thresholds(task, x, rate=0.5))  # high = sorted E[4] -> 3 samples above it
    k = 3 if selection == 'threshold' else 4  # topk: ceil(0.5 * 8)
    calls = []
    task.trainable_module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    o = task(x, y)
    assert calls == [8 + k]  # one student forward on B + K rows
    assert o['output'].shape == (8, NUM_CLASSES)
    assert float(o['he_da_frac']) == pytest.approx(k / 8) and float(o['he_da_loss'].detach()) > 0
    torch.testing.assert_close(o['loss'], o['task_loss'] + o['kd_loss'] + 0.5 * o['he_da_loss'])
    o['loss'].backward()


def test_he_da_nothing_selected_gives_zero_term_valid_graph():
    x, y = _batch(8)
    task = _task(distill_loss='energy_kd', he_da=HighEnergyMix('mixup'))
    thr = _thresholds(task, x)
    thr.high = 1e9  # nobody above high
    task.set_thresholds(thr)
    o = task(x, y)
    assert float(o['he_da_loss']) == 0.0 and float(o['he_da_frac']) == 0.0
    o['loss'].backward()


def test_he_da_fixed_temperature():
    x, y = _batch(8)
    task = _task(distill_loss='energy_kd', he_da=HighEnergyMix('mixup', selection='topk', rate=0.5,
                                                               generator=np.random.default_rng(0)),
                 he_da_temperature=4.0, threshold_mode='batch')
    o = task(x, y)
    assert torch.isfinite(o['he_da_loss'])


def test_graded_policy_and_running_mode_state_roundtrip():
    x, y = _batch(10)
    task = _task(distill_loss='energy_kd', temperature_policy=GradedTemperature(num_bins=5),
                 threshold_mode='running', running_momentum=0.5)
    task.train()
    task(x, y)
    task(_batch(10, seed=1)[0], y)
    state = task.get_task_state()
    assert 'estimator' in state and bool(state['estimator']['initialized'])
    task2 = _task(distill_loss='energy_kd', temperature_policy=GradedTemperature(num_bins=5),
                  threshold_mode='running', running_momentum=0.5)
    task2.load_task_state(state)
    for k, v in task.threshold_estimator.state_dict().items():
        assert torch.equal(v, task2.threshold_estimator.state_dict()[k])
    x3 = _batch(10, seed=2)[0]
    torch.testing.assert_close(task2(x3, y)['loss'], task(x3, y)['loss'])


def test_dataset_state_roundtrip_and_progress(tmp_path):
    x, y = _batch(10)
    task = _task(distill_loss='energy_dkd')
    task.set_thresholds(_thresholds(task, x), he_da_thresholds=_thresholds(task, x, rate=0.5))
    task.set_progress(7.5)
    state = task.get_task_state()
    torch.save(state, tmp_path / 's.pt')
    state = torch.load(tmp_path / 's.pt', weights_only=True)  # timm resumes with weights_only=True
    task2 = _task(distill_loss='energy_dkd')
    task2.load_task_state(state)
    assert task2.thresholds == task.thresholds and task2.he_da_thresholds == task.he_da_thresholds
    assert task2.distill_loss.epoch == 7.5 and float(task2.he_da_high) == task.he_da_thresholds.high
    torch.testing.assert_close(task2(x, y)['loss'], task(x, y)['loss'])
    ckpt = task.get_checkpoint_state()
    assert 'state_dict' in ckpt and 'task_state' in ckpt
    assert not any(k.startswith('teacher') for k in ckpt['state_dict'])  # student only


def test_teacher_stays_in_eval_and_frozen():
    task = _task()
    task.train()
    assert not task.teacher.training and task.trainable_module.training
    assert not any(p.requires_grad for p in task.teacher.parameters())


def test_calibrate_with_task_teacher_matches_direct_energies():
    x, _ = _batch(20)
    task = _task()
    loader = [(x[i:i + 6], None) for i in range(0, 20, 6)]
    thr = calibrate_thresholds(task.teacher_logits, loader, 0.2, progress=False)
    assert thr == EnergyThresholds.from_energies(energy_score(task.teacher_logits(x)), 0.2, identity={'N': 20})


def test_teacher_by_name_uses_student_num_classes(tmp_path):
    teacher = timm.create_model('resnet10t', num_classes=NUM_CLASSES)
    path = tmp_path / 'teacher.pth'
    torch.save(teacher.state_dict(), path)
    student = timm.create_model('resnet10t', num_classes=NUM_CLASSES)
    task = EnergyDistillationTask(student, 'resnet10t', teacher_pretrained_path=str(path), distill_loss='kd',
                                  verbose=False)
    assert task.teacher.model.num_classes == NUM_CLASSES
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, task.teacher.model.state_dict()[k])


@pytest.mark.slow
def test_tiny_timm_model_trains_loss_goes_down():
    torch.manual_seed(0)
    student = timm.create_model('resnet10t', num_classes=NUM_CLASSES)
    teacher = Tiny(1)
    x, y = _batch(8, hw=16)
    task = EnergyDistillationTask(student, teacher, distill_loss='energy_kd', task_loss_weight=0.5,
                                  threshold_mode='running', verbose=False)
    task.train()
    opt = torch.optim.Adam(task.trainable_module.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        o = task(x, y)
        opt.zero_grad()
        o['loss'].backward()
        opt.step()
        losses.append(float(o['loss'].detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_loss_module_needs_per_sample_and_nonfinite_rows_are_masked():
    class PlainKL(nn.Module):
        uses_energy_temperature = True

        def forward(self, s, t, target, temperature):
            return kd_loss_per_sample(s, t, temperature).mean()

    with pytest.raises(ValueError, match='per_sample'):
        _task(distill_loss=PlainKL(), threshold_mode='batch')

    class RowKL(PlainKL):
        def per_sample(self, s, t, target, temperature, valid=None):
            return kd_loss_per_sample(s, t, temperature)

    x, y = _batch(6)
    task = _task(distill_loss=RowKL(), threshold_mode='batch')
    real = task.teacher.model.forward
    task.teacher.model.forward = lambda inp: torch.cat([real(inp)[:5], torch.full((1, NUM_CLASSES), float('nan'))])
    o = task(x, y)
    o['loss'].backward()
    assert float(o['teacher_nonfinite']) == 1.0 and torch.isfinite(o['loss'])
    assert all(torch.isfinite(p.grad).all() for p in task.trainable_module.parameters())


def test_soft_targets_with_he_da_and_dkd():
    from timm.loss import SoftTargetCrossEntropy
    x, y = _batch(8)
    soft = torch.nn.functional.one_hot(y, NUM_CLASSES).float() * 0.9 + 0.1 / NUM_CLASSES
    task = _task(distill_loss='energy_dkd', criterion=SoftTargetCrossEntropy(), threshold_mode='batch',
                 he_da=HighEnergyMix('mixup', selection='topk', rate=0.5, generator=np.random.default_rng(0)))
    task.set_progress(30)
    o = task(x, soft)
    o['loss'].backward()
    assert torch.isfinite(o['loss']) and float(o['he_da_loss'].detach()) > 0


def test_compile_eager_backend_keeps_forward():
    x, y = _batch()
    task = _task(distill_loss='kd')
    before = task(x, y)['loss'].detach()
    eval_model = task.compile(backend='eager')
    assert task.get_eval_model() is eval_model
    torch.testing.assert_close(task(x, y)['loss'].detach(), before)


def test_he_da_output_rows_are_the_original_batch():
    x, y = _batch(8)
    task = _task(distill_loss='energy_kd', threshold_mode='batch',
                 he_da=HighEnergyMix('cutmix', selection='topk', rate=0.5, generator=np.random.default_rng(0)))
    task.trainable_module.eval()  # BatchNorm in eval: rows do not interact, so the first B rows must match
    x_before = x.clone()
    o = task(x, y)
    assert torch.equal(x, x_before)
    torch.testing.assert_close(o['output'], task.trainable_module(x))


def test_ema_checkpoint_state_includes_task_state():
    task = _task(distill_loss='energy_kd', threshold_mode='running')
    task.setup_ema(decay=0.9)
    x, y = _batch()
    task.train()
    task(x, y)['loss'].backward()
    task.update_ema()
    ckpt = task.get_checkpoint_state(ema=True)
    assert 'state_dict_ema' in ckpt and 'estimator' in ckpt['task_state_ema']


def test_task_is_timms_logit_distillation_task():
    """Shared behaviour comes from timm's class: weighting, train(), prepare_distributed, compile."""
    task = _task(distill_loss='kd')
    assert isinstance(task, LogitDistillationTask)
    for name in ('prepare_distributed', 'compile'):
        assert getattr(EnergyDistillationTask, name) is getattr(LogitDistillationTask, name), name
    assert isinstance(task.teacher, timm.task.DistillationTeacher)


def test_teacher_name_with_other_pretrained_class_count_is_refused():
    # timm would drop the 1000-class pretrained head for a 5-class student and give a random one
    student = timm.create_model('resnet10t', num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match='random'):
        EnergyDistillationTask(student, 'resnet10t', distill_loss='kd', verbose=False)


def test_timm_only_arguments_are_checked():
    with pytest.raises(ValueError, match='not an argument'):
        _task(distill_loss='kd', no_such_timm_argument=1)
