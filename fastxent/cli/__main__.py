"""``python -m fastxent.cli``: the command line (same as the ``fastxent`` script)."""

from . import main

raise SystemExit(main())
