"""``python -m vidsparse <command>``: same as the ``vidsparse`` console script."""

import sys

from vidsparse.cli import main

if __name__ == "__main__":
    sys.exit(main())
