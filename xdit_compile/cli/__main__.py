"""``python -m xdit_compile.cli``: the same as the ``xdit-compile`` command."""

import sys

from xdit_compile.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
