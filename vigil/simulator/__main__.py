"""``python -m vigil.simulator``: run the device simulator (see ``publisher.main``)."""

from vigil.simulator.publisher import main

raise SystemExit(main())
