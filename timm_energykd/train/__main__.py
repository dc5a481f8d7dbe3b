from .trainer import cli

raise SystemExit(cli())
