"""``python -m timm_energykd.hub export|push``: the Hub release from the command line."""
import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .push import HubPushError, push_to_hub
from .run_output import export_from_training_output

__all__ = ['main']


def _read_label_names(path: Optional[str]) -> Optional[List[str]]:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f'--label-names file {p} does not exist')
    text = p.read_text(encoding='utf-8')
    if p.suffix == '.json':
        names = json.loads(text)
        if isinstance(names, dict):  # an export's config.json: its label_names
            names = names.get('label_names')
        if not isinstance(names, list):
            raise ValueError(f'--label-names {p}: expected a JSON list of class names (or a config.json with label_names)')
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m timm_energykd.hub', description='Export / push timm-energykd students.')
    sub = parser.add_subparsers(dest='command', required=True)
    ex = sub.add_parser('export', help='export a timm training output folder or checkpoint in Hub layout')
    ex.add_argument('source', help='timm output folder (args.yaml + model_best.pth.tar/last.pth.tar) or a checkpoint')
    ex.add_argument('export_dir', help='folder to write model.safetensors, config.json, README.md')
    ex.add_argument('--weights', default='auto', choices=('auto', 'model', 'ema'),
                    help='auto (default): the weights the run picked its best checkpoint by (EMA for timm\'s train.py with '
                         'EMA on, the plain model for train_energykd.py)')
    ex.add_argument('--label-names', default=None, help='text file (one class name per line), a JSON list, or an export\'s config.json')
    ex.add_argument('--model', default=None, help='architecture when args.yaml lacks "model"')
    ps = sub.add_parser('push', help='upload an export folder to the Hugging Face Hub')
    ps.add_argument('folder', help='export folder (from `export` or the trainer\'s --export-hub)')
    ps.add_argument('repo_id', help='USER/NAME or ORG/NAME')
    ps.add_argument('--private', action='store_true', help='create the repository as private')
    ps.add_argument('--revision', default=None, help='branch to push to (created if missing)')
    ps.add_argument('--token-env', default=None, metavar='VAR',
                    help='environment variable holding the token (default: huggingface_hub\'s HF_TOKEN / login)')
    ps.add_argument('--commit-message', default='Upload timm-energykd student')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        if args.command == 'export':
            out = export_from_training_output(
                args.source, args.export_dir, weights=args.weights,
                label_names=_read_label_names(args.label_names), model_name=args.model)
            print(f'Exported to {out}')
        else:
            token = None
            if args.token_env:
                token = os.environ.get(args.token_env)
                if not token:
                    raise ValueError(f'--token-env: environment variable {args.token_env} is not set or empty')
            url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                              token=token, commit_message=args.commit_message)
            print(f'Pushed to {url}')
    except (HubPushError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0

