"""``python -m llnode`` is the same as the ``llnode`` console script."""

from llnode.cli import main

raise SystemExit(main())
