"""Issue 6, untrusted files: checkpoints from elsewhere are read as safetensors or with
``torch.load(weights_only=True)``; a malicious pickle is refused by every reading path and never runs.
Also: the checkpoint saver never leaves a moment without a complete ``last`` checkpoint."""
import argparse
import ast
import os
from pathlib import Path

import pytest
import timm
import torch

from timm_energykd.train import trainer as train_energykd
from timm_energykd.demo import make_demo_imagefolder
from timm_energykd.files import load_checkpoint_file, load_state_dict_file
from timm_energykd.teacher import build_teacher

REPO = Path(__file__).resolve().parents[1]


def _touch(path):
    Path(path).write_text('pwned')
    return 0


class _Payload:
    """Unpickling this calls ``_touch(marker)``: what arbitrary code in a checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / 'marker'
    sd = timm.create_model('test_resnet', num_classes=4).state_dict()
    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': sd, 'epoch': 0, 'extra': _Payload(marker)}, path)
    with open(path, 'rb'):
        pass
    return dict(path=path, marker=marker, root=tmp_path)


def test_payload_is_real(evil):
    # the file really runs code when fully unpickled (so the refusals below mean something)
    torch.load(evil['path'], weights_only=False)
    assert evil['marker'].read_text() == 'pwned'


def test_library_readers_refuse(evil):
    with pytest.raises(ValueError, match='cannot read checkpoint'):
        load_checkpoint_file(evil['path'], flag='--resume')
    with pytest.raises(ValueError, match='--teacher-checkpoint: cannot read checkpoint'):
        load_state_dict_file(evil['path'], flag='--teacher-checkpoint')
    with pytest.raises(ValueError, match='--teacher-checkpoint: cannot read checkpoint'):
        build_teacher('test_resnet', 4, checkpoint=str(evil['path']))
    from timm_energykd.models.convert import load_mdistiller_state_dict
    with pytest.raises(Exception):
        load_mdistiller_state_dict(str(evil['path']))
    from timm_energykd import hub
    (evil['root'] / 'args.yaml').write_text('model: test_resnet\n')
    os.replace(evil['path'], evil['root'] / 'last.pth.tar')
    with pytest.raises(Exception):
        hub.load_training_output(evil['root'])
    assert not evil['marker'].exists()


def test_trainer_refuses_every_checkpoint_flag(evil, tmp_path):
    data = make_demo_imagefolder(tmp_path / 'data', train_per_class=2, val_per_class=1, size=32, num_classes=4)
    common = [str(data), '--img-size', '32', '--batch-size', '4', '--workers', '0', '--device', 'cpu',
              '--output', str(tmp_path / 'out'), '--epochs', '1', '--model', 'test_resnet', '--experiment', 'x']
    p = str(evil['path'])
    cases = [
        (['--teacher', 'test_resnet', '--teacher-checkpoint', p], '--teacher-checkpoint: cannot read checkpoint'),
        (['--resume', p], '--resume: cannot read checkpoint'),
        (['--initial-checkpoint', p], '--initial-checkpoint: cannot load .*evil.pth.tar into --model test_resnet'),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            train_energykd.main(common + extra)
        assert '\n' not in str(e.value)
    assert not evil['marker'].exists()
    assert not (tmp_path / 'out' / 'x').exists()


def _torch_load_calls(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, 'id', '')
            owner = getattr(getattr(f, 'value', None), 'id', '')
            if (owner, name) == ('torch', 'load') or (owner == 'pickle' and name in ('load', 'loads')):
                yield node, owner, name


def test_every_torch_load_in_the_code_is_weights_only():
    files = sorted(REPO.glob('timm_energykd/**/*.py')) + [REPO / 'train_energykd.py'] + \
        sorted(REPO.glob('benchmarks/**/*.py'))
    seen = 0
    for path in files:
        for node, owner, name in _torch_load_calls(path):
            where = f'{path.relative_to(REPO)}:{node.lineno}'
            assert owner == 'torch', f'{where}: {owner}.{name} unpickles arbitrary objects'
            kw = {k.arg: k.value for k in node.keywords}
            assert isinstance(kw.get('weights_only'), ast.Constant) and kw['weights_only'].value is True, \
                f'{where}: torch.load without weights_only=True'
            seen += 1
    assert seen >= 2  # io.load_checkpoint_file, convert, hub


def test_hub_reads_a_real_training_checkpoint(tmp_path):
    # timm / trainer checkpoints store args as an argparse.Namespace: allowed, and nothing else
    from timm_energykd import hub
    sd = timm.create_model('test_resnet', num_classes=4).state_dict()
    torch.save({'state_dict': sd, 'epoch': 0, 'args': argparse.Namespace(model='test_resnet')},
               tmp_path / 'last.pth.tar')
    (tmp_path / 'args.yaml').write_text('model: test_resnet\nnum_classes: 4\n')
    state_dict, run_info, metrics, which = hub.load_training_output(tmp_path)
    assert list(state_dict) == list(sd) and all(torch.equal(state_dict[k], sd[k]) for k in sd)
    assert run_info['model'] == 'test_resnet' and run_info['num_classes'] == 4 and which == 'model'


def test_last_checkpoint_never_missing(tmp_path, monkeypatch):
    """A kill at the rename keeps the previous complete ``last`` (timm unlinks it first)."""
    model = torch.nn.Linear(2, 2)
    saver = train_energykd.AtomicCheckpointSaver(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                 checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(0, metric=1.0)
    before = (tmp_path / 'last.pth.tar').read_bytes()

    class Killed(BaseException):
        pass

    def replace(src, dst):
        raise Killed  # the process dies at the rename

    monkeypatch.setattr(os, 'replace', replace)
    with pytest.raises(Killed):
        saver.save_checkpoint(1, metric=2.0)
    assert (tmp_path / 'last.pth.tar').read_bytes() == before
    assert load_checkpoint_file(tmp_path / 'last.pth.tar')['epoch'] == 0
