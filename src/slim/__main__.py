"""`python -m slim …`, the same as the `slim` command.

May import: slim.cli.
"""

import sys

from .cli.commands import main

sys.exit(main())
