"""``python -m tlbsim``: the same as the ``tlbsim`` command."""

import sys

from tlbsim.cli import main

sys.exit(main())
