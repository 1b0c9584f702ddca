"""The one exception type for problems a user can fix (bad input, missing data, unknown names)."""


class OODBenchError(Exception):
    """A user-facing error: the CLI prints its message on one line (traceback only with --debug).

    The message must say what was wrong and how to fix it.
    """


class NotFittedError(OODBenchError):
    """A method scored before its statistics were fitted (or loaded)."""


def memory_bytes() -> int:
    """The machine's physical memory in bytes."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_allocation(nbytes: float, what: str, fix: str = "") -> None:
    """An OODBenchError, before anything is allocated, when `what` would need more than half the memory."""
    if nbytes > memory_bytes() / 2:
        raise OODBenchError(f"{what} would need {nbytes / 2 ** 30:.1f} GiB, more than half this machine's memory "
                            f"({memory_bytes() / 2 ** 30:.1f} GiB)" + (f"; {fix}" if fix else ""))
