"""``python -m amaml_ext``: the ``amaml-ext`` command."""

import sys

from .cli import main

sys.exit(main())
