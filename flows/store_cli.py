"""`advfeatures report`, `ls` and `gc`: the report of a run folder and the store's inventory
(``pipeline.html_report``, ``pipeline.inventory``), printed for a terminal."""

from __future__ import annotations

from typing import Any

from advfeatures.config import default_store
from storage.store import Store


def report(args: Any) -> int:
    from pipeline.html_report import write_report
    from pipeline.report_data import resolve_run

    store, folder = resolve_run(Store(args.store) if args.store else None, args.run)
    path = write_report(store, folder, device=args.device)
    print(f"{folder / 'report.md'}\nreport: {path}")
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows)


def ls(args: Any) -> int:
    from pipeline import inventory as I

    store = Store(args.store or default_store())
    reach = I.reachable(store, I.run_folders(store, args.runs)) if args.runs else None
    arts = I.list_artifacts(store, args.stage, args.incomplete, args.key, reach)
    rows = [[a.stage, a.key, I.summary(a), I.human(a.bytes), a.created, "yes" if a.complete else "NO"] for a in arts]
    if rows:
        print(_table(rows, ["stage", "key", "what", "size", "date (UTC)", "complete"]))
    total = sum(a.bytes for a in arts)
    print(f"{len(arts)} artifacts, {I.human(total)}, in {store.root}")
    return 0


def gc(args: Any) -> int:
    from pipeline import inventory as I

    store = Store(args.store or default_store())
    rows = I.collect(store, args.runs or None, args.min_age_hours, delete=args.delete)
    if rows:
        print(_table([[r["action"], r["stage"], r["key"], r["what"], I.human(r["bytes"]), r["created"]] for r in rows],
                     ["action", "stage", "key", "what", "size", "date (UTC)"]))
    gone = [r for r in rows if r["action"] in ("delete", "deleted")]
    size = I.human(sum(r["bytes"] for r in gone))
    kept = len(rows) - len(gone)
    which = "the given runs" if args.runs else "any run"
    if args.delete:
        print(f"deleted {len(gone)} artifacts ({size}) that {which} does not reach; {kept} kept (recent or locked)")
    else:
        print(f"dry run: {len(gone)} artifacts ({size}) are reached by no {'given ' if args.runs else ''}run and "
              f"would be deleted; {kept} kept (recent or locked). Rerun with --yes to delete them.")
    return 0
