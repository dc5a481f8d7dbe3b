"""Share a distilled student on the Hugging Face Hub: run record -> model card -> export -> push.

* ``record.py``: ``RunRecord``, the settings that shaped the student (the card's only input),
* ``card.py``: the model card, front matter from huggingface_hub's ``ModelCardData`` / ``EvalResult``,
* ``export.py``: ``export_for_hub``, timm's ``save_for_hf`` into an atomically replaced folder,
* ``push.py``: ``push_to_hub`` with ``HfApi``,
* ``run_output.py``: rebuild the student from a timm training output folder,
* ``cli.py`` / ``__main__.py``: ``python -m timm_energykd.hub export|push``.

See docs/HUB.md.
"""
from .record import RunRecord, RESULT_SETTINGS, RECIPE_SETTINGS
from .card import build_model_card, card_for_repo, needs_plugin, CARD_KEYS
from .export import export_for_hub, EXPORT_FILES, OPTIONAL_FILES
from .push import HubPushError, push_to_hub
from .run_output import load_training_output, export_from_training_output, read_summary_metrics, record_for_output
from .cli import main

__all__ = [
    'RunRecord', 'RESULT_SETTINGS', 'RECIPE_SETTINGS', 'build_model_card', 'card_for_repo', 'needs_plugin', 'CARD_KEYS',
    'export_for_hub', 'EXPORT_FILES', 'OPTIONAL_FILES', 'HubPushError', 'push_to_hub', 'load_training_output',
    'export_from_training_output', 'read_summary_metrics', 'record_for_output', 'main',
]
