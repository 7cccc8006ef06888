"""``python -m demoe ...``: the ``demoe`` command, for where its script is not on PATH."""

from .cli import main

raise SystemExit(main())
