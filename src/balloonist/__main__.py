"""``python -m balloonist``: the same command line as the ``balloonist`` script."""

import sys

from balloonist.cli import main

if __name__ == "__main__":
    sys.exit(main())
