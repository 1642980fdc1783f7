"""Expected failures: each carries one line that names the problem and the fix."""


class StageError(RuntimeError):
    """A stage could not finish (diverged, workers failed, a server unreachable)."""


class DivergedError(StageError):
    """The loss went NaN or infinite: the run is failed, and nothing from it is promoted."""
