"""``python -m mmalign`` (and ``accelerate launch -m mmalign``): the ``mmalign`` command."""

from __future__ import annotations

import sys

from mmalign.cli import main

sys.exit(main())
