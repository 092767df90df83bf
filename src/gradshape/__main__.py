"""``python -m gradshape``: the same as the ``gradshape`` command."""

from .cli import main

raise SystemExit(main())
