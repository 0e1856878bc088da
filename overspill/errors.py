"""User-facing errors: one line that says what went wrong and what to do about it."""


class OverspillError(Exception):
    """An error caused by the user's input or machine, printed without a traceback by the CLI."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A dependency's exception as one line (its type when it has no message), to quote inside an
    OverspillError: some messages span lines, e.g. huggingface_hub's field validation errors."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
