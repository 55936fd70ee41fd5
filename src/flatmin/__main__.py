"""`python -m flatmin` is the `flatmin` console script."""

from flatmin.cli import main

raise SystemExit(main())
