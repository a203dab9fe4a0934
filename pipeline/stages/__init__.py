"""One module per stage kind (see ``pipeline.kinds``), each with ``execute(store, spec, ctx)``.

The names below are the executors' functions with their own signatures, re-exported for callers
that drive stages by hand (tests, benchmarks)."""

from pipeline.common import load_model, load_split, run_record, save_set, state_sha256  # noqa: F401
from pipeline.integrity import find, verify  # noqa: F401
from pipeline.stages.construct import (  # noqa: F401
    build_control,
    build_errors,
    finalize_construct,
    generate,
    import_released,
    pgd_set,
    prepare_construct,
    run_shard,
)
from pipeline.stages.dataset import ingest, locate_source, source_sha256  # noqa: F401
from pipeline.stages.evaluation import evaluate  # noqa: F401
from pipeline.stages.model import initial_model, train_model  # noqa: F401
from pipeline.stages.select import select_rows  # noqa: F401
from pipeline.stages.student import train_student  # noqa: F401
