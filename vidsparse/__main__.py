"""``python -m vidsparse <command>``: same as the ``vidsparse`` console script."""

import sys

if __name__ == "__main__":
    try:
        from vidsparse.cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python starts: one line, as anywhere later
        print("vidsparse: interrupted.", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
