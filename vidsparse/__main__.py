"""``python -m vidsparse <command>`` and the ``vidsparse`` console script."""

import os
import signal
import sys

from vidsparse.errors import EXIT_INTERRUPTED


def run() -> None:
    """Run the command line and exit with its status (130 after Ctrl-C, with one line said)."""
    try:
        from vidsparse.cli import main

        code = main()
    except KeyboardInterrupt:  # Ctrl-C while the command line is imported: one line, as anywhere later
        print("vidsparse: interrupted.", file=sys.stderr)
        code = EXIT_INTERRUPTED
    # The command has finished (or said it was interrupted): a Ctrl-C landing while the
    # interpreter shuts down (atexit handlers, module teardown) would otherwise end the process
    # by the signal, with no message and exit status -2 instead of the one just decided.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code == EXIT_INTERRUPTED:
        # After a Ctrl-C the process still ended by SIGINT at exit now and then (status -2 after
        # the message; about 1 of 6 interrupts on a loaded 2-core machine), most likely CPython's
        # own re-raise of an interrupt it counts as unhandled, whatever sys.exit was given. The
        # command has already cleaned up (outputs are written atomically), so leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
