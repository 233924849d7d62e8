"""``python -m posbias.cli`` runs ``profile-bias``."""

import sys

from posbias.cli import main

if __name__ == "__main__":
    sys.exit(main())
