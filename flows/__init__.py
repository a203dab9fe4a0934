"""The orchestration: Prefect flows, the CLI, serve/deploy/workers. Importing it registers the
fan-out settings (``fanout.*``, ``flows.settings``)."""

from flows import settings as _settings  # noqa: F401 - registers the fanout config section
