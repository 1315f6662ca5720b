"""The ``worldflow`` command (:func:`main`): a module per subcommand, the parser in ``cli.app``."""

from worldflow.cli.app import main

__all__ = ["main"]
