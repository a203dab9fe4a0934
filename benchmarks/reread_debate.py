"""Read the debate again from committed experiment tables, with the reading rules of
``pipeline.readings`` (no stage recomputed): writes OUT/table.csv, table.md and debate.png.

    python benchmarks/reread_debate.py results/debate controls=results/debate/parts/controls.csv:RUN_KEY ...

Each NAME is an experiment of the debate; RUN_KEY (optional) names the run that wrote the table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.experiments.debate import reread  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    reread(dict(a.split("=", 1) for a in sys.argv[2:]), sys.argv[1])
