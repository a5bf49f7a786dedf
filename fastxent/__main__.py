"""``python -m fastxent``: the command line (same as the ``fastxent`` script)."""

from .cli import main

raise SystemExit(main())
