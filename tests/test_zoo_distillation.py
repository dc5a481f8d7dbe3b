"""Our models as timm distillation teachers given BY NAME, in timm's LogitDistillationTask and in ours.

A teacher name goes through timm's ``DistillationTeacher``: ``create_model(name, pretrained=True,
num_classes=<student's>, in_chans=<student's>, device=..., dtype=...)`` with the weights file as
``pretrained_cfg_overlay``. Before issue 14 this raised (no ``device`` argument, no ``model.in_chans``).
"""
import pytest
import torch
import torch.nn as nn

import timm
from timm.task import LogitDistillationTask

import timm_energykd  # noqa: F401  (registers the models)
from timm_energykd.task import EnergyDistillationTask

TEACHER = 'cifar_resnet32x4'
NUM_CLASSES = 5


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    """A 3-channel, 5-class ``cifar_resnet32x4`` state dict: what a trained CIFAR teacher file holds."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('teacher') / 'resnet32x4.pth'
    torch.save(timm.create_model(TEACHER, num_classes=NUM_CLASSES).state_dict(), path)
    return path


def _task(task_cls, student, teacher_file):
    if task_cls is EnergyDistillationTask:
        return EnergyDistillationTask(student, TEACHER, nn.CrossEntropyLoss(), teacher_pretrained_path=str(teacher_file),
                                      distill_loss='energy_kd', threshold_mode='batch', verbose=False)
    return LogitDistillationTask(student, TEACHER, nn.CrossEntropyLoss(), teacher_pretrained_path=str(teacher_file),
                                 temperature=4.0, verbose=False)


@pytest.mark.parametrize('in_chans', [3, 1])
@pytest.mark.parametrize('task_cls', [LogitDistillationTask, EnergyDistillationTask])
def test_teacher_by_name_follows_the_student(task_cls, in_chans, teacher_file, one_thread):
    torch.manual_seed(0)
    student = timm.create_model('cifar_resnet8', num_classes=NUM_CLASSES, in_chans=in_chans)
    task = _task(task_cls, student, teacher_file)

    teacher = task.teacher.model
    saved = torch.load(teacher_file, weights_only=True)
    assert type(teacher).__name__ == 'CifarResNet' and teacher.pretrained_cfg['architecture'] == TEACHER
    assert teacher.num_classes == NUM_CLASSES and teacher.in_chans == in_chans == teacher.conv1.in_channels
    assert not teacher.training
    # the file's weights, the stem summed over its RGB filters for a 1-channel student (timm's adapt_input_conv)
    torch.testing.assert_close(teacher.fc.weight, saved['fc.weight'], rtol=0, atol=0)
    stem = saved['conv1.weight'] if in_chans == 3 else saved['conv1.weight'].sum(dim=1, keepdim=True)
    torch.testing.assert_close(teacher.conv1.weight, stem)

    task.train()
    x = torch.randn(4, in_chans, 32, 32)
    out = task(x, torch.tensor([0, 1, 2, 3]))
    assert out['output'].shape == (4, NUM_CLASSES) and torch.isfinite(out['loss'])
    out['loss'].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_timm_distillation_task_accepts_every_family_as_student(teacher_file, one_thread):
    # LogitDistillationTask reads student.in_chans / num_classes / pretrained_cfg (mean, std)
    for name in ('cifar_wrn_16_1', 'cifar_vgg8', 'cifar_mobilenetv2', 'cifar_shufflenetv1', 'cifar_shufflenetv2'):
        student = timm.create_model(name, num_classes=NUM_CLASSES)
        task = _task(LogitDistillationTask, student, teacher_file)
        out = task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
        assert out['output'].shape == (2, NUM_CLASSES) and torch.isfinite(out['loss']), name
