"""``python -m fastcnc train|eval|report`` (same as the ``fastcnc`` console script)."""

import sys

from fastcnc.cli import main

sys.exit(main())
