"""One module per stage kind, each declaring itself (``pipeline.kinds.declare``) with its
executor ``execute(store, spec, ctx)``; set builders live in ``pipeline.sets`` and in the
experiments that bring them.

The names below are the executors' functions with their own signatures, re-exported for callers
that drive stages by hand (tests, benchmarks)."""

from pipeline.common import load_model, load_split, run_record, save_set, state_sha256  # noqa: F401
from pipeline.integrity import find, verify  # noqa: F401
from pipeline.stages.construct import attack_summary, generate  # noqa: F401
from pipeline.stages.dataset import ingest, locate_source, source_sha256  # noqa: F401
from pipeline.stages.evaluation import evaluate  # noqa: F401
from pipeline.stages.model import initial_model, train_model  # noqa: F401
from pipeline.stages.select import select_rows  # noqa: F401
from pipeline.stages.student import train_student  # noqa: F401
from pipeline.sets.errors import build_errors  # noqa: F401, I001 - the core set builders
from pipeline.sets.pgd import finalize_construct, pgd_set, prepare_construct, run_shard  # noqa: F401
