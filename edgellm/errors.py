"""The one error type a user sees: a problem they can fix, told in one line."""


class EdgeError(Exception):
    """A user mistake or a missing piece of the environment.

    ``problem`` says what is wrong, ``fix`` what to do about it. The CLI prints
    ``error: <problem> (<fix>)`` and exits non-zero; no traceback, because the
    user's next step is in the message, not in the stack.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} ({fix})")
