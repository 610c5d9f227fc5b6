"""``python -m core.pretrain``."""

from core.pretrain.cli import main

raise SystemExit(main())
