#!/usr/bin/env python3
"""Train with energy-based knowledge distillation: the same flags, --config and output folder as timm's train.py.

A shim kept for ``python train_energykd.py ...``; the trainer is ``timm_energykd.train`` (also installed as the
``timm-energykd-train`` command). See docs/TRAINING.md.
"""
from timm_energykd.train import cli

if __name__ == '__main__':
    raise SystemExit(cli())
