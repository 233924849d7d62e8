"""``python -m posbias.cli`` runs ``profile-bias``."""

import sys

from posbias.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
