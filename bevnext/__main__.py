"""``python -m bevnext`` runs the ``bevnext`` command."""

import sys

from bevnext.cli import main

sys.exit(main())
