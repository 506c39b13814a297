"""``python -m vidsparse <command>``: same as the ``vidsparse`` console script."""

import signal
import sys

if __name__ == "__main__":
    try:
        from vidsparse.cli import main

        code = main()
    except KeyboardInterrupt:  # Ctrl-C while Python starts: one line, as anywhere later
        print("vidsparse: interrupted.", file=sys.stderr)
        code = 130
    # The command has finished (or said it was interrupted): a Ctrl-C landing while the
    # interpreter shuts down (atexit handlers, module teardown) would otherwise end the process
    # by the signal, with no message and exit status -2 instead of the one just decided.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
