"""`python -m sd35fp8.cli ...` (same as the `sd35fp8` console script)."""

from sd35fp8.cli import main

raise SystemExit(main())
