"""``python -m ldpruner``: the CLI."""

import sys

from ldpruner.cli import main

sys.exit(main())
