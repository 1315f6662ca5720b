"""``python -m worldflow.cli ...``: the same as the ``worldflow`` command."""

import sys

from worldflow.cli.main import main

sys.exit(main())
