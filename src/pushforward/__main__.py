"""``python -m pushforward ...`` runs the command line (see :mod:`pushforward.cli`)."""

from .cli import main

raise SystemExit(main())
