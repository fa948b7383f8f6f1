"""The command line, ``xdit-compile`` (``explain``, ``run``, ``generate``, ``plan``, ``serve``,
``client``).

The top front end: may import anything in the package; nothing imports it.
"""

from xdit_compile.cli.main import main

__all__ = ["main"]
