"""Import mdistiller / RepDistiller CIFAR checkpoints into the timm models of this package.

Their checkpoints are ``torch.save({'model': state_dict, ...})`` files; the state dict uses their module
names. ``remap_mdistiller_state_dict`` renames the keys for one of our models, and
``convert_mdistiller_checkpoint`` reads a file (``torch.load(weights_only=True)``, never arbitrary
unpickling), remaps it and loads it strictly, so the model computes the same logits as the original.

CLI::

    python -m timm_energykd.models.convert SRC --model cifar_wrn_16_2 --num-classes 100 --output OUT.safetensors

The written file loads with ``timm.create_model(NAME, num_classes=N, pretrained=True,
pretrained_cfg_overlay=dict(file='OUT.safetensors'))`` or ``checkpoint_path='OUT.safetensors'``.
"""
import argparse
import os
import sys
import tempfile
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

import timm

from . import cifar_mobilenetv2, cifar_resnet, cifar_shufflenet, cifar_vgg, cifar_wrn, shufflenetv2

__all__ = [
    'MDISTILLER_NAMES', 'remap_mdistiller_state_dict', 'load_mdistiller_state_dict',
    'convert_mdistiller_checkpoint', 'save_safetensors', 'main',
]

# Our registered name -> the name of the same architecture in mdistiller / RepDistiller (model_dict keys).
MDISTILLER_NAMES: Dict[str, str] = {
    'cifar_resnet8': 'resnet8',
    'cifar_resnet14': 'resnet14',
    'cifar_resnet20': 'resnet20',
    'cifar_resnet32': 'resnet32',
    'cifar_resnet44': 'resnet44',
    'cifar_resnet56': 'resnet56',
    'cifar_resnet110': 'resnet110',
    'cifar_resnet8x4': 'resnet8x4',
    'cifar_resnet32x4': 'resnet32x4',
    'cifar_wrn_16_1': 'wrn_16_1',
    'cifar_wrn_16_2': 'wrn_16_2',
    'cifar_wrn_40_1': 'wrn_40_1',
    'cifar_wrn_40_2': 'wrn_40_2',
    'cifar_vgg8': 'vgg8',
    'cifar_vgg11': 'vgg11',
    'cifar_vgg13': 'vgg13',
    'cifar_vgg16': 'vgg16',
    'cifar_vgg19': 'vgg19',
    'cifar_mobilenetv2': 'MobileNetV2',
    'cifar_shufflenetv1': 'ShuffleV1',
    'cifar_shufflenetv2': 'ShuffleV2',
}

_FILTERS: Dict[str, Callable] = {
    'cifar_resnet': cifar_resnet.checkpoint_filter_fn,
    'cifar_wrn': cifar_wrn.checkpoint_filter_fn,
    'cifar_vgg': cifar_vgg.checkpoint_filter_fn,
    'cifar_mobilenetv2': cifar_mobilenetv2.checkpoint_filter_fn,
    'cifar_shufflenetv1': cifar_shufflenet.checkpoint_filter_fn,
    'cifar_shufflenetv2': shufflenetv2.checkpoint_filter_fn,
}


def _check_model_name(model_name: str) -> None:
    if model_name not in MDISTILLER_NAMES:
        raise ValueError(
            f'--model: expected one of {", ".join(sorted(MDISTILLER_NAMES))}, got {model_name!r}')


def remap_mdistiller_state_dict(state_dict: Dict[str, Any], model_name: str) -> Dict[str, Any]:
    """Rename the keys of an mdistiller / RepDistiller state dict to those of our ``model_name``.

    Args:
        state_dict: Their ``checkpoint['model']`` (a ``module.`` DataParallel prefix is removed).
        model_name: One of our registered CIFAR names (see ``MDISTILLER_NAMES``).

    Returns:
        A new dict with the same tensors under our names.
    """
    _check_model_name(model_name)
    family = next(f for f in sorted(_FILTERS, key=len, reverse=True) if model_name.startswith(f))
    return _FILTERS[family](dict(state_dict))


def load_mdistiller_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read the tensors of an mdistiller / RepDistiller checkpoint file, safely.

    Accepts ``{'model': state_dict, ...}`` (their format), ``{'state_dict': ...}`` or a bare state dict.
    Raises FileNotFoundError / ValueError with one line naming the file when it cannot be used.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects.
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / unsafe files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = reason if len(reason) <= 120 else reason[:117] + '...'
        raise ValueError(
            f'{path}: not a readable torch checkpoint with weights_only=True ({type(e).__name__}: {reason})'
        ) from None
    if isinstance(checkpoint, dict):
        for key in ('model', 'state_dict'):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        keys = list(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: expected a dict with key 'model' holding a state dict of tensors, got {keys}")
    return checkpoint


def _describe_mismatch(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Optional[str]:
    """One line describing how ``state_dict`` differs from ``model``'s, or None when it matches exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}'
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f'{len(missing)} missing keys (e.g. {missing[0]})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys (e.g. {unexpected[0]})')
    if shapes:
        parts.append(f'{len(shapes)} shape mismatches (e.g. {shapes[0]})')
    return '; '.join(parts)


def convert_mdistiller_checkpoint(path: str, model_name: str, num_classes: int = 100) -> nn.Module:
    """Build ``model_name`` and load an mdistiller / RepDistiller checkpoint into it, strictly.

    Args:
        path: Checkpoint file (``torch.save({'model': state_dict})``).
        model_name: One of our registered CIFAR names (e.g. ``cifar_wrn_16_2``).
        num_classes: Classes of the checkpoint's classifier.

    Returns:
        The model in eval mode, with the checkpoint's weights.
    """
    _check_model_name(model_name)
    if num_classes < 1:
        raise ValueError(f'--num-classes: expected a positive class count, got {num_classes}')
    state_dict = remap_mdistiller_state_dict(load_mdistiller_state_dict(path), model_name)
    model = timm.create_model(model_name, num_classes=num_classes)
    problem = _describe_mismatch(state_dict, model)
    if problem is not None:
        fc = state_dict.get('fc.weight')
        hint = ''
        if fc is not None and fc.ndim == 2 and fc.shape[0] != num_classes and \
                fc.shape[1] == model.num_features:
            hint = f' (its classifier has {fc.shape[0]} classes: pass --num-classes {fc.shape[0]})'
        raise ValueError(f'{path}: does not match {model_name} (num_classes={num_classes}): {problem}{hint}')
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def save_safetensors(model: nn.Module, output: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``model.state_dict()`` to ``output`` as safetensors, atomically (temp file + rename)."""
    from safetensors.torch import save_file
    output = os.fspath(output)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='.safetensors')
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m timm_energykd.models.convert',
        description='Import an mdistiller / RepDistiller CIFAR checkpoint into a timm_energykd model '
                    'and write it as safetensors.')
    p.add_argument('src', help="checkpoint file: torch.save({'model': state_dict})")
    p.add_argument('--model', required=True, help='our model name, e.g. cifar_resnet8x4, cifar_wrn_16_2')
    p.add_argument('--num-classes', type=int, default=100, help='classes of the checkpoint (default 100)')
    p.add_argument('--output', required=True, help='output .safetensors file')
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not args.output.endswith('.safetensors'):
        print(f'error: --output: expected a file name ending in .safetensors, got {args.output!r}', file=sys.stderr)
        return 2
    try:
        model = convert_mdistiller_checkpoint(args.src, args.model, args.num_classes)
        save_safetensors(model, args.output, metadata={
            'format': 'pt', 'architecture': args.model, 'num_classes': str(args.num_classes)})
    except (FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in model.parameters())
    print(f'wrote {args.output}: {args.model}, {args.num_classes} classes, {n_params:,} parameters')
    return 0


if __name__ == '__main__':
    sys.exit(main())
