"""The timm-style trainer: ``python train_energykd.py ...`` or the installed ``timm-energykd-train`` command.

Nothing in the library imports this package; it only parses flags, builds the library's objects and loops.
"""
from .trainer import cli, main, train

__all__ = ['cli', 'main', 'train']
