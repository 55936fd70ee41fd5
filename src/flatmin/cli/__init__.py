"""The `flatmin` command: the dispatcher (`main`), the shared options, one module per command.

The top of the import graph: nothing in the library imports this package, and only the
dispatcher imports a command module.
"""

from flatmin.cli.main import COMMANDS, main

__all__ = ["COMMANDS", "main"]
