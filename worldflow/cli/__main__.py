"""``python -m worldflow.cli ...``: the same as the ``worldflow`` command."""

import sys

from worldflow.cli import main

sys.exit(main())
