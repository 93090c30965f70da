"""``python -m vigil_tools.simulator``: run the device simulator (see ``publisher.main``)."""

from vigil_tools.simulator.publisher import main

raise SystemExit(main())
