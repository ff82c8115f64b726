"""``python -m mmalign`` (and ``accelerate launch -m mmalign``): the ``mmalign`` command."""

from __future__ import annotations

import sys

from mmalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
