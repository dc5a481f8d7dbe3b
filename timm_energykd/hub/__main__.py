"""``python -m timm_energykd.hub export|push`` (see ``timm_energykd.hub.cli``)."""
import sys

from .cli import main

sys.exit(main())
