"""Fleet triage: many memory images x many Volatility plugins on a Dask cluster, into a
Parquet store queried with DuckDB (``python -m volatility3_xen triage --help``).

Modules, one job each: ``spec`` (records passed between driver and workers), ``worker``
(one Volatility run per task), ``table`` (TreeGrid values -> typed Arrow columns),
``store`` (Parquet batches + DuckDB views), ``run`` (Dask orchestration), ``analysis``
(summary, rare values, diff), ``progress`` (the terminal bar), ``cli``.

Needs the ``triage`` extra: ``pip install 'volatility3-xen[triage]'``.
"""

from volatility3_xen import __version__

__all__ = ["__version__"]
