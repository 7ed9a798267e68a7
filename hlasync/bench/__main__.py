"""``python -m hlasync.bench [SUITE ...] [--quick] [--out DIR]``."""

from __future__ import annotations

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
