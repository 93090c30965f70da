"""``python -m vigil.stack``: the local stack's command line (see :mod:`vigil.stack.cli`)."""

from vigil.stack.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
