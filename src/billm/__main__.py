"""``python -m billm ...`` is the same as the ``billm`` command."""

import sys

from .cli import main

sys.exit(main())
