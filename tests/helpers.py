"""Small builders shared by several test modules (imported as ``from helpers import ...``)."""
import argparse

import timm
import torch


def random_teacher_checkpoint(path, num_classes: int = 4, seed: int = 0, nan: bool = False) -> str:
    """Write a timm-style checkpoint of a randomly initialised ``test_resnet`` teacher; returns its path.

    ``nan=True`` fills the classifier bias with NaN (a teacher whose logits are not finite).
    """
    torch.manual_seed(seed)
    sd = timm.create_model('test_resnet', num_classes=num_classes).state_dict()
    if nan:
        sd = {k: (torch.full_like(v, float('nan')) if k == 'fc.bias' else v) for k, v in sd.items()}
    torch.save({'epoch': 0, 'state_dict': sd, 'args': argparse.Namespace(model='test_resnet'), 'version': 2}, path)
    return str(path)


def dataset_args(data_dir, **overrides):
    """The trainer's own args for ``data_dir`` (timm's defaults and ours, batch 4), with ``overrides``: what
    ``create_train_eval_datasets`` reads in a real run."""
    from timm_energykd.train.args import parse_args
    args, _ = parse_args([str(data_dir), '--batch-size', '4', '--seed', '0'])
    args.world_size = 1
    for key, value in overrides.items():
        setattr(args, key, value)
    return args
