"""`python -m batch`: the same command as `resnest-batch`."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
