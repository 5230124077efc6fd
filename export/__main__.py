"""Entry point of `python -m export`."""

from .cli import main

raise SystemExit(main())
