"""``python -m balloonist.agent``: run the balloon agent (see ``balloonist.agent.main``)."""

from __future__ import annotations

import sys

from balloonist.agent.main import main

if __name__ == "__main__":
    sys.exit(main())
