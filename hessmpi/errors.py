"""The two kinds of failure the command line distinguishes (CONTRACT.md: exit 2 and exit 1)."""


class UsageError(Exception):
    """Bad input from the user: a config key or value, a missing or damaged file. Exit status 2."""


class RunFailed(Exception):
    """A run that started and could not go on (non-finite loss, diverged ranks). Exit status 1."""


class RunStopped(Exception):
    """A run stopped on request (SIGTERM, SIGUSR1) after writing a checkpoint; it can be
    resumed. Exit status 75 (EX_TEMPFAIL: try again)."""


class NonFiniteLoss(RunFailed):
    """The global training loss of a step is NaN or infinite (every rank sees the same
    reduced value, so every rank raises it at the same step)."""

    def __init__(self, value: float):
        super().__init__(f"the training loss is {value}")
        self.value = value


class RankLost(RunFailed):
    """A run that cannot end in order because a rank stopped answering (the asynchronous
    server's timeout on a worker): reported, then every rank is ended with MPI_Abort.
    Exit status 1."""
