"""Helpers for tests that start localsgl commands as processes."""
import signal


def interruptible() -> None:
    """``preexec_fn``: SIGINT as in a terminal's foreground job.  A suite started in the
    background by a non-interactive shell runs with SIGINT ignored, and an ignored signal stays
    ignored across exec (Python then installs no KeyboardInterrupt handler), so a Ctrl-C test
    would send a signal the command never sees."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
