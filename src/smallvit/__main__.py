"""`python -m smallvit ...` is the `smallvit` command."""

import sys

from .cli import main

sys.exit(main())
