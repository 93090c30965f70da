"""``python -m vigil_tools.stack``: the local stack's command line
(see :mod:`vigil_tools.stack.cli`)."""

from vigil_tools.stack.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
