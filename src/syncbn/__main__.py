"""``python -m syncbn``: the command line (see :mod:`syncbn.cli`)."""

from syncbn.cli import main

if __name__ == "__main__":  # spawned ranks import this module as __mp_main__: do not re-run
    raise SystemExit(main())
