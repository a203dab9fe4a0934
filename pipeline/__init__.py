"""The pipeline layer: stage kinds and their executors, plans (experiments) and reports.

Sits between the maths (``advfeatures``: models, attacks, training, data readers; no storage, no
prefect) and the orchestration (``tasks``/``flows``: the only prefect importers). Executors load
their inputs by key from a ``storage.Store``, call the library, and write through ``storage``,
manifest last. Nothing here imports prefect.
"""


def _discover() -> None:
    from pipeline.kinds import discover

    discover()


def _register() -> None:
    from advfeatures.config import add_discovery

    add_discovery(_discover)  # configs resolved from now on know every experiment's section and set kind


_register()
