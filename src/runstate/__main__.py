"""``python -m runstate``: the same as the ``runstate`` command."""

import sys

from runstate.cli import main

sys.exit(main())
