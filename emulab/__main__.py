"""``python -m emulab``: the same as the ``emulab`` command."""

import sys

from emulab.cli import main

sys.exit(main())
