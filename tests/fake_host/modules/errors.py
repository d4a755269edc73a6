"""Fake `modules.errors`: records what would be shown, so tests can assert on swallowed errors."""

reported: list[tuple[str, bool]] = []
displayed: list[tuple[BaseException, str]] = []


def report(message: str, *, exc_info: bool = False) -> None:
    reported.append((message, exc_info))


def display(e: BaseException, task: str, *, full_traceback: bool = False) -> None:
    displayed.append((e, task))


def print_error_explanation(message: str) -> None:
    reported.append((message, False))
