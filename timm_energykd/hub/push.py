"""Upload an export folder to the Hugging Face Hub with ``HfApi``; every client failure is one ``HubPushError``."""
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from .card import card_for_repo
from .export import CARD_NAME, CONFIG_NAME, EXPORT_FILES, OPTIONAL_FILES, WEIGHTS_NAME, find_pickles

__all__ = ['HubPushError', 'push_to_hub']

_logger = logging.getLogger(__name__)


class HubPushError(RuntimeError):
    """Uploading an export folder to the Hugging Face Hub failed; the local export is untouched."""


def _one_line(text: str, token: Optional[str]) -> str:
    text = ' '.join(str(text).split())
    if token:
        text = text.replace(token, '***')
    return text[:300]


def _stage(folder: Path, repo_id: str) -> Path:
    """A sibling copy of the export to upload (weights hard-linked where possible) whose card loads
    ``hf-hub:repo_id`` instead of the local folder; the export itself is never modified."""
    staging = Path(tempfile.mkdtemp(prefix=f'.{folder.name}.push-', dir=folder.resolve().parent))
    try:
        for name in EXPORT_FILES + OPTIONAL_FILES:
            src = folder / name
            if not src.is_file():
                continue
            if name == CARD_NAME:
                text = card_for_repo(src.read_text(encoding='utf-8'), str(folder.resolve()), repo_id)
                (staging / name).write_text(text, encoding='utf-8')
                continue
            try:
                os.link(src, staging / name)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(src, staging / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def push_to_hub(
        folder: Union[str, Path],
        repo_id: str,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        token: Optional[str] = None,
        commit_message: str = 'Upload timm-energykd student',
        create_pr: bool = False,
) -> str:
    """Upload an export folder to the Hub with ``HfApi`` (create_repo(exist_ok) + upload_folder).

    Args:
        folder: an export written by ``export_for_hub``; checked to hold config.json and
            model.safetensors and no pickle files before anything is sent.
        repo_id: ``user/name`` or ``org/name``.
        private: create the repository as private (an existing repository keeps its visibility).
        revision: branch to push to; created from the default branch when missing.
        token: Hub token; ``None`` lets huggingface_hub read ``HF_TOKEN`` / its stored login. Never
            written to disk or logged.
        commit_message: commit message on the Hub.
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        The repository URL (``https://huggingface.co/<repo_id>``).

    Raises:
        FileNotFoundError / ValueError: bad folder or repo id (before any network access).
        HubPushError: any failure of the Hub client (network, HTTP, auth, offline mode); the local
            folder is left as it was.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'push_to_hub: export folder {folder} does not exist')
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f'push_to_hub: {folder} is not a Hub export (missing {", ".join(missing)})')
    stray = find_pickles(folder)
    if stray:
        raise ValueError(f'push_to_hub: {folder} holds pickle files {stray}; exports must be safetensors only')
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
        if '/' not in repo_id:
            raise ValueError('expected USER/NAME or ORG/NAME')
    except ValueError as e:
        raise ValueError(f'push_to_hub: invalid repo_id {repo_id!r}: {_one_line(e, token)}') from None
    if constants.HF_HUB_OFFLINE:
        raise HubPushError(f'push to {repo_id} failed: offline mode is on (HF_HUB_OFFLINE=1); local export kept at {folder}')

    from .. import __version__
    staging = _stage(folder, repo_id)
    try:
        api = HfApi(token=token, library_name='timm-energykd', library_version=__version__)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        full_id = getattr(repo_url, 'repo_id', None) or repo_id
        if revision and revision != 'main' and not create_pr:
            api.create_branch(full_id, branch=revision, exist_ok=True)
        api.upload_folder(
            repo_id=full_id, folder_path=str(staging), revision=revision, commit_message=commit_message,
            create_pr=create_pr, allow_patterns=list(EXPORT_FILES + OPTIONAL_FILES))
    except Exception as e:
        secret = token
        if not secret:  # the client resolved HF_TOKEN / the stored login itself: mask that one too
            try:
                from huggingface_hub import get_token
                secret = get_token()
            except Exception:
                secret = None
        raise HubPushError(
            f'push to {repo_id} failed: {type(e).__name__}: {_one_line(e, secret)}; local export kept at {folder}'
        ) from None  # no chained traceback: it could carry request headers
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    url = str(repo_url) if repo_url else f'https://huggingface.co/{full_id}'
    _logger.info(f'Pushed {folder} to {url}' + (f' (revision {revision})' if revision else ''))
    return url
