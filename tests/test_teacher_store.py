"""Issue 19: the teacher-output store (``timm_energykd.teacher_store``) on its own: storage formats, the top-k
energy and its measured loss error, identity refusal, the size estimate, atomic shards."""
import json
import os

import pytest
import torch

from timm_energykd.energy import energy_score
from timm_energykd.teacher_store import (TeacherStore, compress_topk, estimate_bytes, expand_topk, row_bytes)


def _teacher_like(n=256, c=100, seed=0):
    """Peaked logits like a trained teacher's: one class well above the rest."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 2.0
    logits[torch.arange(n), torch.randint(0, c, (n,), generator=g)] += 8.0
    return logits


def test_topk_keeps_the_energy_and_the_top_classes():
    logits = _teacher_like()
    v, i, e = compress_topk(logits, 10, 4.0, torch.float32)
    assert torch.equal(e, energy_score(logits, 4.0))  # stored exactly (float32, computed the same way)
    dense = expand_topk(v, i, e, 100, 4.0)
    assert torch.equal(dense.gather(1, i.long()), v)  # the kept classes are exact
    # the fill value keeps logsumexp(f / T_E): the recomputed energy matches to float rounding
    torch.testing.assert_close(energy_score(dense, 4.0), e, rtol=1e-6, atol=1e-5)


def _kd_errors(k, t):
    """(relative error of the KD loss value, relative error of its gradient w.r.t. the student logits) with
    top-k targets instead of the full teacher, 100 classes, T = t."""
    from timm_energykd.losses import create_distill_loss
    kd = create_distill_loss('kd')
    logits = _teacher_like()
    v, i, e = compress_topk(logits, k, 4.0, torch.float32)
    dense = expand_topk(v, i, e, 100, 4.0)
    losses, grads = [], []
    for target in (logits, dense):
        s = (_teacher_like(seed=1) * 0.5).requires_grad_()
        loss = kd.per_sample(s, target, None, t).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(s.grad)
    return abs(losses[1] / losses[0] - 1), float((grads[1] - grads[0]).norm() / grads[0].norm())


# measured 2026-12-02 (this file's synthetic teacher: tail logits N(0, 2), one class +8); docs/REPLAY.md
@pytest.mark.parametrize('k,t,loss_err,grad_err', [
    (10, 4.0, 0.25, 0.35), (50, 4.0, 0.047, 0.124), (10, 2.0, 0.012, 0.119), (50, 2.0, 0.003, 0.025)])
def test_topk_loss_error_is_measured(k, t, loss_err, grad_err):
    """Top-k flattens the tail of the teacher's distribution: the error is real at high T and shrinks with K."""
    got_loss, got_grad = _kd_errors(k, t)
    assert got_loss == pytest.approx(loss_err, abs=0.01) and got_grad == pytest.approx(grad_err, abs=0.01)


def test_float16_rounding_is_within_half_precision():
    logits = _teacher_like()
    back = logits.to(torch.float16).float()
    assert ((back - logits).abs() <= logits.abs() * 2 ** -11 + 1e-7).all()


def test_sizes_follow_the_formula():
    assert row_bytes(100) == 408 and row_bytes(100, 'float16') == 208 and row_bytes(1000, 'float16', 10) == 52
    # CIFAR-100: 240 epochs of 50k images (batch 64 drops 16 a epoch) + the calibration pass
    n = estimate_bytes(50000, 100, 240, 64)
    assert n == (240 * 49984 + 50000) * 408


def _store(tmp_path, **ident):
    identity = dict(teacher='t', seed=0, data_fingerprint='abc', **ident)
    return TeacherStore(str(tmp_path / 'store'), identity, {'dtype': 'float32', 'topk': None, 'num_classes': 4})


def test_identity_mismatch_is_refused_in_one_line(tmp_path):
    s = _store(tmp_path)
    assert not s.check_meta()
    s.write_meta()
    assert s.check_meta()
    other = _store(tmp_path, hflip=0.0)
    other.identity['seed'] = 1
    with pytest.raises(ValueError, match=r'recorded for another run: seed 0 -> 1; hflip null -> 0.0') as e:
        other.check_meta()
    assert '\n' not in str(e.value)


def test_shards_are_atomic_and_completion_needs_every_epoch(tmp_path):
    s = _store(tmp_path)
    s.write_meta()
    s.save_shard(0, {'indices': torch.arange(3)})
    assert s.has_shard(0) and not s.is_complete()
    s.mark_complete([0, 1])  # epoch 1 and the calibration pass missing: not complete
    assert not s.is_complete()
    s.save_shard(1, {'indices': torch.arange(3)})
    s.save_shard(None, {'counts': torch.tensor([3])})
    s.mark_complete([0, 1])
    assert s.is_complete()
    assert not [f for f in os.listdir(s.rank_dir()) if f.endswith('.tmp')]
    assert json.load(open(os.path.join(s.rank_dir(), 'complete.json'))) == {'epochs': [0, 1]}
    with pytest.raises(ValueError, match='epoch 7'):
        s.load_shard(7)
