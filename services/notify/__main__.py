"""``python -m services.notify``: the notify service's process entry point."""

import sys

from services.notify.app import main

sys.exit(main())
