"""loader: fast, exactly-once bulk loads of CSV files into PostgreSQL.

The command line (`loader.cli`) is a thin layer over this library:

    import asyncio
    from loader import LoadOptions, load

    report = asyncio.run(load(LoadOptions(source="data.csv", table="public.events")))
"""

from .errors import LoaderError, TryAgainLater, UsageError
from .options import ConnectOptions, CsvDialect, LoadOptions, RetryPolicy
from .pipeline import load, retry_rejects, status
from .report import Report

__all__ = [
    "ConnectOptions",
    "CsvDialect",
    "LoadOptions",
    "LoaderError",
    "Report",
    "RetryPolicy",
    "TryAgainLater",
    "UsageError",
    "load",
    "retry_rejects",
    "status",
]
