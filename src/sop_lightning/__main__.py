"""``python -m sop_lightning fit | validate | export ...``, the same as the ``sop-lightning`` command."""

import sys

from .cli import main

sys.exit(main())
