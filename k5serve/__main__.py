"""`python -m k5serve` is the `k5serve` command."""

import sys

from k5serve.server.cli import main

sys.exit(main())
