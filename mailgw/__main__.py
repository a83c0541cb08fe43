"""``python -m mailgw``: the ``mailgw`` admin command."""

import sys

from mailgw.cli import main

sys.exit(main())
