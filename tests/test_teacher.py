import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from timm_energykd.files import load_checkpoint_file, save_checkpoint_atomic, write_atomic
from timm_energykd.teacher import build_teacher, classifier_weight_key


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('teacher')
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=4)
    sd = model.state_dict()
    # a timm training checkpoint (args as a Namespace, like timm's CheckpointSaver writes)
    import argparse
    timm_ckpt = root / 'model_best.pth.tar'
    torch.save({'epoch': 3, 'state_dict': sd, 'state_dict_ema': {k: v + 1 if v.is_floating_point() else v
                                                                  for k, v in sd.items()},
                'args': argparse.Namespace(model='test_resnet'), 'version': 2}, timm_ckpt)
    plain = root / 'plain.pth'
    torch.save({'module.' + k: v for k, v in sd.items()}, plain)
    st = root / 'weights.safetensors'
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    return dict(root=root, model=model, sd=sd, timm=timm_ckpt, plain=plain, st=st)


def _same(teacher, sd):
    return all(torch.equal(teacher.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize('key', ['timm', 'plain', 'st'])
def test_loads_each_format_with_its_own_head(trained, key):
    t = build_teacher('test_resnet', 4, checkpoint=str(trained[key]))
    assert _same(t, trained['sd'])
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(t(x), trained['model'].eval()(x))


def test_ema_weights_on_request(trained):
    t = build_teacher('test_resnet', 4, checkpoint=str(trained['timm']), use_ema=True)
    k = classifier_weight_key(t)
    torch.testing.assert_close(t.state_dict()[k], trained['sd'][k] + 1)


def test_class_count_mismatch_is_refused(trained):
    with pytest.raises(ValueError, match=r'predicts 4 classes but the student has 10') as e:
        build_teacher('test_resnet', 10, checkpoint=str(trained['timm']))
    assert '\n' not in str(e.value) and str(trained['timm']) in str(e.value)


def test_wrong_architecture_is_refused(trained):
    with pytest.raises(ValueError, match='does not match --teacher resnet10t|no classifier weight'):
        build_teacher('resnet10t', 4, checkpoint=str(trained['timm']))


def test_missing_and_corrupt_files(trained):
    with pytest.raises(FileNotFoundError, match='--teacher-checkpoint'):
        build_teacher('test_resnet', 4, checkpoint=str(trained['root'] / 'nope.pth'))
    bad = trained['root'] / 'corrupt.pth.tar'
    bad.write_bytes(trained['timm'].read_bytes()[:200])
    with pytest.raises(ValueError, match='cannot read checkpoint') as e:
        build_teacher('test_resnet', 4, checkpoint=str(bad))
    assert str(bad) in str(e.value)


def test_unknown_teacher_name():
    with pytest.raises(ValueError, match="'no_such_net' is not a timm model"):
        build_teacher('no_such_net', 4)


def test_pretrained_head_mismatch_message(monkeypatch):
    # no download: pretend timm's pretrained model has 1000 classes
    real = timm.create_model
    monkeypatch.setattr(timm, 'create_model', lambda name, pretrained=False, **kw: real(name, num_classes=1000))
    monkeypatch.setattr('timm_energykd.teacher._check_hub_reachable', lambda name: None)  # as if cached
    with pytest.raises(ValueError, match='predicts 1000 classes but the student has 4'):
        build_teacher('test_resnet', 4, pretrained=True)


def test_atomic_writes_leave_no_temp_files(tmp_path):
    p = write_atomic(tmp_path / 'a' / 'x.txt', 'hello')
    assert p.read_text() == 'hello'
    write_atomic(p, b'bytes')
    assert p.read_bytes() == b'bytes'
    c = save_checkpoint_atomic({'w': torch.ones(2)}, tmp_path / 'c.pth.tar')
    assert torch.equal(load_checkpoint_file(c)['w'], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ['a', 'c.pth.tar'] and os.listdir(tmp_path / 'a') == ['x.txt']


class _Evil:
    pass


def test_unsafe_pickle_is_refused(tmp_path):
    p = tmp_path / 'evil.pth'
    torch.save({'x': _Evil()}, p)  # an arbitrary (non-allow-listed) Python object
    with pytest.raises(ValueError, match='cannot read checkpoint'):
        load_checkpoint_file(p, flag='--resume')


def test_named_teacher_is_pretrained_by_default_like_timm():
    from timm_energykd.teacher import resolve_teacher_pretrained
    assert resolve_teacher_pretrained('resnet50', None, None) is True  # timm has weights: use them
    assert resolve_teacher_pretrained('cifar_resnet8', None, None) is False  # none exist: random (warned)
    assert resolve_teacher_pretrained('resnet50', None, 'teacher.pth.tar') is False  # the checkpoint wins
    assert resolve_teacher_pretrained('resnet50', False, None) is False  # --no-teacher-pretrained
    assert resolve_teacher_pretrained('cifar_resnet8', True, None) is True


def test_pretrained_download_failure_is_one_clear_line(monkeypatch):
    import timm_energykd.teacher as teacher_mod

    def offline(*a, **k):
        raise OSError('We have no connection or you passed local_files_only')
    monkeypatch.setattr(teacher_mod.timm, 'create_model', offline)
    monkeypatch.setattr(teacher_mod, '_check_hub_reachable', lambda name: None)  # the Hub answers, the load fails
    with pytest.raises(ValueError, match=r"--teacher-pretrained: could not load timm's pretrained weights for "
                                         r"'resnet10t' .*--no-teacher-pretrained") as e:
        teacher_mod.build_teacher('resnet10t', 1000, pretrained=True)
    assert '\n' not in str(e.value)


def test_unreachable_hub_fails_in_one_connection(monkeypatch):
    """Offline and not cached: one refused connection, not huggingface_hub's retries (about a minute)."""
    import socket
    import timm_energykd.teacher as teacher_mod
    calls = []

    def refuse(addr, timeout=None):
        calls.append(addr)
        raise OSError('Name or service not known')
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(teacher_mod.timm, 'create_model', lambda *a, **k: pytest.fail('the download was tried'))
    with pytest.raises(ValueError, match=r"--teacher-pretrained: timm's pretrained weights for 'resnet10t' "
                                         r"\(timm/resnet10t.*\) are not in the local Hub cache and .* is not "
                                         r"reachable: Name or service not known; pass --teacher-checkpoint") as e:
        teacher_mod.build_teacher('resnet10t', 1000, pretrained=True)
    assert '\n' not in str(e.value) and len(calls) == 1
