"""``python -m visdet_export``: the ``visdet-export`` command."""

import sys

from .cli import main

sys.exit(main())
