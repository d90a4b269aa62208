"""``python -m meshnode`` is the ``meshnode`` command."""

from meshnode.cli import main

raise SystemExit(main())
