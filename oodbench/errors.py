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


SEED_LIMIT = 2 ** 31


def check_seed(seed, what: str = "--seed") -> int:
    """The seed as an int in [0, 2**31), else an OODBenchError naming `what`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise OODBenchError(f"{what} must be a whole number from 0 to {SEED_LIMIT - 1}, got {seed!r}")
    return seed


def system_error_message(e: BaseException) -> str:
    """One line for an OS or allocation error on a user-facing path: what failed and what to do."""
    import errno

    if isinstance(e, MemoryError):
        return ("out of memory; use a smaller batch (--set eval.batch_size=...), fewer images, or a machine "
                "with more memory")
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device{where}; files written before this one are intact: free some space "
                "and run the command again (training continues with --resume)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write{where}: {e.strerror}; choose a folder you can write to (--runs-dir, --out) "
                "or fix its permissions")
    if e.errno == errno.ENOTDIR:
        return f"a folder was expected but a file is in the way{where}; name a folder (--runs-dir, --out)"
    return f"{e.strerror or e}{where}"
