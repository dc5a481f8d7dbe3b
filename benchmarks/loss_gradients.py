#!/usr/bin/env python3
"""Gradient scale of every registered distillation loss, as a ratio to KD, at a student's first step.

The step a loss asks for is lr x its gradient, so a loss whose logit gradient is several times KD's needs
a smaller learning rate (or gradient clipping) than a KD recipe. This prints, per batch size, the norm of
d loss / d student logits for each loss divided by KD's, all measured on the same batch in one run:
student logits near zero (a freshly initialised student), teacher logits N(0, teacher_scale^2), the
teacher's arg-max as the label, the same base temperature for every loss.

    python benchmarks/loss_gradients.py                        # C = 10, B = 32 64 128, T = 4
    python benchmarks/loss_gradients.py --num-classes 100 --batch-sizes 64
"""
import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import command_line, machine_info, markdown_table  # noqa: E402

import torch  # noqa: E402

import timm_energykd  # noqa: E402,F401  (registers every loss)
from timm_energykd.losses import create_distill_loss, list_distill_losses  # noqa: E402


def logit_gradient_norms(losses: List[str], batch_size: int, num_classes: int, temperature: float,
                         student_scale: float, teacher_scale: float, seeds: int) -> dict:
    """Mean over ``seeds`` batches of ||d loss / d student logits||, per loss."""
    norms = {name: 0.0 for name in losses}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        student = torch.randn(batch_size, num_classes, generator=g) * student_scale
        teacher = torch.randn(batch_size, num_classes, generator=g) * teacher_scale
        target = teacher.argmax(dim=1)
        for name in losses:
            loss_fn = create_distill_loss(name)
            if hasattr(loss_fn, 'set_progress'):
                loss_fn.set_progress(1e9)  # past any warm-up (DKD): the full-strength loss
            s = student.clone().requires_grad_()
            loss = loss_fn(s, teacher, target, temperature)
            grad, = torch.autograd.grad(loss, s)
            norms[name] += grad.norm().item() / seeds
    return norms


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--losses', nargs='+', default=None,
                   help='losses to compare (default: every registered one except energy_*, which equal their base '
                        'loss at one temperature)')
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 64, 128])
    p.add_argument('--temperature', type=float, default=4.0, help='base temperature given to every loss')
    p.add_argument('--student-scale', type=float, default=0.1, help='std of the student logits (fresh init)')
    p.add_argument('--teacher-scale', type=float, default=5.0, help='std of the teacher logits')
    p.add_argument('--seeds', type=int, default=5, help='batches averaged per cell')
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> str:
    args = parse_args(argv)
    losses = args.losses or [n for n in list_distill_losses() if not n.startswith('energy_')]
    unknown = [n for n in losses if n not in list_distill_losses()]
    if unknown:
        raise SystemExit(f'--losses: unknown {unknown}; expected some of: {" ".join(list_distill_losses())}')
    losses = ['kd'] + [n for n in losses if n != 'kd']  # the reference row first
    rows = {name: [] for name in losses}
    for b in args.batch_sizes:
        norms = logit_gradient_norms(losses, b, args.num_classes, args.temperature, args.student_scale,
                                     args.teacher_scale, args.seeds)
        for name in losses:
            rows[name].append(f'{norms[name] / norms["kd"]:.2f}')
    info = machine_info()
    table = markdown_table(['loss'] + [f'B={b}' for b in args.batch_sizes], [[n] + r for n, r in rows.items()])
    text = (f'Logit-gradient norm / KD\'s, C={args.num_classes}, T={args.temperature:g}, student logits '
            f'N(0, {args.student_scale:g}^2), teacher N(0, {args.teacher_scale:g}^2), mean of {args.seeds} batches\n'
            f'{command_line(argv, "benchmarks/loss_gradients.py")}\n'
            f'{info["date_utc"]}, torch {info["torch"]}, timm {info["timm"]}\n\n{table}')
    print(text)
    return text


if __name__ == '__main__':
    main()
