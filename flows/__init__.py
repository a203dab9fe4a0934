"""The orchestration: Prefect flows, the CLI, serve/deploy/workers. Importing it registers the
orchestration settings (``fanout.*``, ``dask.*``, ``report.*``: ``pipeline.orchestration``)."""

from pipeline import orchestration as _settings  # noqa: F401 - registers fanout, dask and report
