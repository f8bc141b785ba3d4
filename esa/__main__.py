"""`python -m esa` is the `esa` command."""

from esa.cli import main

raise SystemExit(main())
