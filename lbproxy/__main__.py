"""`python -m lbproxy`: the same as the `lbproxy` command."""

from lbproxy.cli import main

raise SystemExit(main())
