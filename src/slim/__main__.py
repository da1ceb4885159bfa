"""`python -m slim …`, the same as the `slim` command."""

import sys

from .cli import main

sys.exit(main())
