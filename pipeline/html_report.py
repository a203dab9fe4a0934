"""One report per run folder: ``report.html`` (self-contained: figures inlined as PNG data URLs,
styles inline, no script) and ``report.md`` (figures referenced under ``figures/``), written into
the run or sweep folder beside the tables, from what the store holds:

    write_report(store, folder) -> path of report.html

Sections: the tables, the figures (``pipeline.figures``; PNG and SVG under ``figures/``), the
per-stage timings, the config and every stage's key, and the environment. It works on any run
folder of any experiment (and on sweep folders) after the fact: nothing is rerun.
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline import figures as F
from pipeline import report_data as D
from pipeline.report import init_note, summarize
from storage.store import Store

CSS = """body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:24px;color:#1d2430}h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;
border-bottom:1px solid #dde3ea;padding-bottom:4px}.meta{color:#5b6573}table{border-collapse:collapse;
font-size:12px;margin:8px 0}th,td{border:1px solid #dde3ea;padding:3px 7px;text-align:right}
th{background:#f3f6f9}td:first-child,th:first-child{text-align:left}figure{margin:12px 0}
figure img{max-width:100%;border:1px solid #eef1f4}figcaption{color:#5b6573;font-size:12px}
pre{background:#f6f8fa;padding:10px;font-size:12px;overflow:auto;max-height:420px}
.wide{overflow-x:auto}details{margin:8px 0}summary{cursor:pointer;color:#3b6ea8}"""


def _shown(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if c.endswith("_key")], errors="ignore")


class _Doc:
    """The report built once as a list of blocks, rendered twice (HTML and Markdown)."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame, id_: str = "", summary: str = "") -> None:
        self.blocks.append(("table", (df, id_, summary)))

    def figure(self, png: Path, caption: str) -> None:
        self.blocks.append(("figure", (png, caption)))

    def pre(self, text: str, summary: str = "") -> None:
        self.blocks.append(("pre", (text, summary)))

    def html(self, title: str, subtitle: str) -> str:
        out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
               f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
               f"<p class='meta'>{html.escape(subtitle)}</p>"]
        for kind, body in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{html.escape(body)}</h2>")
            elif kind == "p":
                out.append(f"<p>{html.escape(body)}</p>")
            elif kind == "table":
                df, id_, summary = body
                tab = "<div class='wide'>" + df.to_html(index=False, float_format=lambda v: f"{v:.1f}", na_rep="",
                                                         border=0, table_id=id_ or None, escape=True) + "</div>"
                out.append(f"<details><summary>{html.escape(summary)}</summary>{tab}</details>" if summary else tab)
            elif kind == "figure":
                png, caption = body
                data = base64.b64encode(png.read_bytes()).decode()
                out.append(f"<figure><img alt='{html.escape(png.stem)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            else:
                text, summary = body
                pre = f"<pre>{html.escape(text)}</pre>"
                out.append(f"<details><summary>{html.escape(summary)}</summary>{pre}</details>" if summary else pre)
        return "\n".join(out) + "\n</body></html>\n"

    def markdown(self, title: str, subtitle: str) -> str:
        out = [f"# {title}", "", subtitle, ""]
        for kind, body in self.blocks:
            if kind == "h2":
                out += [f"## {body}", ""]
            elif kind == "p":
                out += [body, ""]
            elif kind == "table":
                out += ([f"{body[2]}:", ""] if body[2] else []) + [body[0].to_markdown(index=False, floatfmt=".1f"), ""]
            elif kind == "figure":
                png, caption = body
                out += [f"![{png.stem}](figures/{png.name})", "", f"*{caption}*", ""]
            else:
                out += ([f"{body[1]}:", ""] if body[1] else []) + ["```", body[0].rstrip(), "```", ""]
        return "\n".join(out)


def trained_rows_label(df: pd.DataFrame, select: float | None = None) -> str:
    """What the students' rows are, for a column name: "top 40%" for a margin selection of 40%
    (``select``: the run's construct.select; else read from the table's ``trained_rows_%``, which
    per-stratum rounding puts a little above it on small sets), "all rows" without selection."""
    share = df["trained_rows_%"].dropna() if "trained_rows_%" in df else pd.Series(dtype=float)
    selected = share[share < 99.95].round()
    if selected.empty:
        return "all rows" if len(share) else "rows trained on"
    if select is not None and 0 < select < 1:
        return f"top {100 * select:g}%"
    return f"top {selected.iloc[0]:.0f}%" if selected.nunique() == 1 else "top share per set"


def interval_text(lo: float, hi: float, n: int) -> str:
    """A 95% interval clipped to [0, 100]; with 2 seeds, why it is so wide (t(0.975, 1) = 12.7)."""
    from pipeline.report import t_multiplier

    text = f"{max(lo, 0):.1f} – {min(hi, 100):.1f}"
    return text + f" (n=2: t={t_multiplier(2):.1f})" if n == 2 else text


def headline(df: pd.DataFrame, select: float | None = None) -> pd.DataFrame:
    """One row per set: clean accuracy (mean over seeds, its 95% interval), (X, Y+1), the source's
    fooling rate on the whole set and on the rows the students trained on (a margin selection's
    top rows: 100% fooled whenever at least that share of the set is), and the published number:
    the comparison with the paper at a glance. ``select``: the run's construct.select, for the
    column's name."""
    iv = F.set_intervals(df).set_index("set")
    trained = f"source fooled, trained rows ({trained_rows_label(df, select)}) %"
    rows = []
    for set_name, g in df.groupby("set", sort=False):
        r = iv.loc[set_name]
        rows.append({"set": set_name, "models": len(g), "acc (X, Y) %": r["mean"],
                     "std": g["acc_xy_%"].std() if len(g) > 1 else float("nan"),
                     "95% interval": interval_text(r["lo"], r["hi"], len(g)), "acc (X, Y+1) %": g["acc_xy+1_%"].mean(),
                     "source fooled, whole set (all rows) %": g["fooled_whole_set_%"].mean(),
                     trained: g["fooled_trained_rows_%"].mean(), "paper %": r["paper"],
                     "vs chance": "/".join(dict.fromkeys(g["vs_chance"]))})
    return pd.DataFrame(rows)


def fooling_note(df: pd.DataFrame, select: float | None = None) -> str:
    """What the two fooling columns are, in one sentence."""
    what = trained_rows_label(df, select)
    text = ("Source fooled: the share of rows the source classifies as their assigned target, over the whole "
            "constructed set and over the rows the students trained on")
    if what == "all rows":
        return text + ": every row of their set, so the two agree."
    if what.startswith("top"):
        share = "the top share (trained_rows_% below)" if what == "top share per set" else f"the {what}"
        return text + (f": {share} of each set by target margin (construct.select), the rows the source is most "
                       "surely fooled on, so that rate is 100% whenever the source is fooled on at least that share "
                       "of the set.")
    return text + "."


def _results(doc: _Doc, store: Store, info: D.RunInfo, figs: Path) -> None:
    df = info.table
    doc.h2("Results")
    if info.kind == "sweep":
        doc.table(_shown(df), "results")
        axes = [a for a, _ in info.manifest["stage"]["config"]["axes"]]
        doc.figure(F.save(F.sweep_curve(df, axes), figs, "sweep"),
                   "Clean test accuracy at every point of the sweep: mean over seeds, 95% t-interval of the mean "
                   "(one seed: the model's Wilson interval).")
        doc.table(pd.DataFrame(D.sweep_points(info)).assign(overrides=lambda d: d["overrides"].map(" ".join)),
                  "points")
        return
    own = _experiment_report(info)
    if own is not None:  # the experiment's own results section after its table
        doc.table(_shown(df), "results")
        own(doc, store, info, figs)
        return
    select = _config(info).get("construct", {}).get("select")
    doc.table(headline(df, select), "headline")
    doc.p(fooling_note(df, select))
    doc.p(init_note(df))
    doc.table(_shown(df).drop(columns=["n_test"], errors="ignore"), "results", "every model (one row per set and seed)")
    if df["seed"].groupby(df["set"]).size().max() > 1:
        doc.table(summarize(df), "summary", "over seeds: mean, std, 95% t-interval of the mean")
    doc.figure(F.save(F.table1_bars(df), figs, "table1"),
               "Clean test accuracy per set: ours (bar: mean over seeds; dots: every seed; whiskers: the 95% "
               "t-interval of the mean from 3 seeds, else each model's 95% Wilson interval, since with 2 seeds "
               "t(0.975, 1) = 12.7 makes the t-interval uninformative) beside the published numbers (Ilyas et al. "
               "2019 Table 1; Wallace 2019 for errors); dashed: chance.")


def _config(info: D.RunInfo) -> dict[str, Any]:
    """The run's resolved config (config.yaml), {} without one."""
    return (yaml.safe_load(info.config_text) or {}) if info.config_text else {}


def _experiment_report(info: D.RunInfo) -> Any:
    """The report section of the run's experiment, if it brings one (``Experiment.report``)."""
    from advfeatures.config import ConfigError
    from pipeline.experiments import get

    if info.kind in ("", "sweep"):
        return None
    try:
        return get(info.kind).report
    except ConfigError:  # an experiment this code does not know: the generic sections
        return None


def _sets(doc: _Doc, store: Store, info: D.RunInfo, figs: Path) -> None:
    sets = [s for s in D.perturbed_sets(info) if store.is_complete("constructed", s["key"])]
    if not sets:
        return
    doc.h2("Constructed sets")
    examples = [e for e in (D.examples(store, s) for s in sets) if e is not None]
    if examples:
        doc.figure(F.save(F.image_grid(examples), figs, "images"),
                   "Per set: clean training images with their true label, the stored images the students train on "
                   "with their assigned label (✓: the source predicts it), and the perturbation, amplified.")
    recs = [(info.labels[s["key"]], D.set_records(store, s["key"])) for s in sets]
    eps = next((s["config"]["attack"]["eps"] for s in sets if "attack" in s["config"]), None)
    doc.figure(F.save(F.attack_histograms(recs, eps), figs, "attack_histograms"),
               "Per-example perturbation norm (on the stored images) and the source's target loss.")
    classes = store.manifest("constructed", sets[0]["key"]).get("classes")
    if classes:
        doc.figure(F.save(F.fooling_per_class(recs, classes), figs, "fooling_per_class"),
                   "The share of rows the source classifies as their target, per target class, over rows whose "
                   "target differs from the true label.")


def _models(doc: _Doc, store: Store, info: D.RunInfo, figs: Path, device: str) -> None:
    hist = D.histories(store, info)
    if hist:
        doc.h2("Training")
        doc.figure(F.save(F.training_curves(hist), figs, "training"),
                   "Training loss and accuracy per epoch of every model (students: on their constructed labels).")
    for builder in D.set_builders(info):  # the figures the run's set builders draw of their sets
        if builder.report is not None:
            builder.report(doc, store, info, figs, device)


def _appendix(doc: _Doc, store: Store, info: D.RunInfo) -> None:
    if info.stages:
        t = D.timings(store, info)
        doc.h2("Stages and timings")
        doc.p(f"{int(t['complete'].sum())} of {len(t)} stages complete; {t['seconds'].sum():.0f} s of stage time "
              "in all (each stage's own seconds, whenever it was computed).")
        doc.table(t, "timings")
    doc.h2("Configuration")
    doc.pre(info.config_text or "(no config.yaml)", "resolved config (config.yaml)")
    env = D.environment(store, info)
    doc.h2("Environment")
    kv = {"run key": info.key, "run written": env["created"], "report made": env["report_made"],
          "models trained on": ", ".join(env["devices"]) or "-",
          **{k: str(v) for k, v in env["environment"].items()},
          **{f"code {k}": str(v) for k, v in env["code_version"].items()},
          **{f"report {k}": v for k, v in env["report_libraries"].items()}}
    doc.table(pd.DataFrame({"what": list(kv), "value": list(kv.values())}), "environment")
    if env["runtime"]:
        doc.pre(yaml.safe_dump(env["runtime"], sort_keys=False), "runtime settings of the run stage (not keyed)")


def build(store: Store, folder: Any, device: str = "cpu") -> tuple[str, str, dict[str, bytes]]:
    """(HTML, Markdown, {figures/<file>: bytes}) of a run or sweep folder."""
    info = D.load_run(store, folder)
    with tempfile.TemporaryDirectory(prefix="advfeatures-report-") as tmp:
        figs = Path(tmp)
        doc = _Doc()
        _results(doc, store, info, figs)
        if info.kind != "sweep":
            _sets(doc, store, info, figs)
            _models(doc, store, info, figs, device)
        _appendix(doc, store, info)
        name = _config(info).get("name", "")
        title = ("Sweep" if info.kind == "sweep" else info.kind if _experiment_report(info) else "Run") + f" {info.key}"
        subtitle = (f"profile {name}; " if name else "") + f"{store.url}; written {info.manifest.get('created', '')[:19]}"
        files = {f"figures/{p.name}": p.read_bytes() for p in sorted(figs.iterdir())}
        return doc.html(title, subtitle), doc.markdown(title, subtitle), files


def write_report(store: Store, folder: Any, device: str = "cpu", if_changed: bool = False) -> Any:
    """Write report.html, report.md and figures/ into ``folder``, then ``report.json`` (what they
    were drawn from); return report.html's path. With ``if_changed``, a report drawn from the same
    files by the same code (``report_data.report_is_current``) is left as it is."""
    if if_changed and D.report_is_current(folder):
        return folder / "report.html"
    page, md, files = build(store, folder, device)
    try:
        (folder / "figures").mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # object stores: a "folder" exists as soon as a file under it does
        pass
    for name, data in files.items():
        D.put(folder / name, data)
    D.put(folder / "report.md", md.encode())
    D.put(folder / "report.html", page.encode())
    D.put(folder / D.REPORT_RECORD, D.report_record(folder, [*files, "report.md", "report.html"]))
    return folder / "report.html"
