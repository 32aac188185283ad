"""``python -m keyledger.cli``."""

import sys

from . import main

sys.exit(main())
