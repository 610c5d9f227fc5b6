"""``python -m core.model.convert``."""

from core.model.convert.cli import main

raise SystemExit(main())
