"""The report (figures, HTML, Markdown) of a tiny run, its numbers against known answers, its
rendering in headless Chromium, and progress events (they must not change any result)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from advfeatures.config import resolve
from pipeline import kinds, progress
from pipeline.common import Context
from pipeline.experiments import get
from pipeline.stages import source_sha256
from storage.store import Store, atomic_write_json

FIGURES = ("table1", "images", "attack_histograms", "fooling_per_class", "training", "det_confusion")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tar):
    """A finished tiny replicate run (bare executors; margin selection; two seeds), its report
    written, and the progress events it emitted."""
    store = tmp_path_factory.mktemp("report-store")
    cfg = resolve("tiny", ["construct.select=0.5", "student.seeds=[0, 1]", "construct.n_images=100"],
                  data=str(tiny_tar), store=str(store))
    plan = get("replicate").plan(cfg, source_sha256(tiny_tar))
    st = Store(store)
    events: list[dict] = []
    with progress.sink(events.append):
        kinds.run_all(st, plan, Context(runtime=cfg.runtime, data=cfg.data, plan=plan, config=cfg))
    from pipeline.html_report import write_report

    folder = st.path("runs", plan.run.key)
    return st, plan, cfg, folder, write_report(st, folder), events


def test_report_files_tables_and_figures(tiny_run):
    st, plan, _, folder, html_path, _ = tiny_run
    assert html_path == folder / "report.html"
    for name in FIGURES:
        for ext in ("png", "svg"):
            assert (folder / "figures" / f"{name}.{ext}").stat().st_size > 1000, (name, ext)
    page = html_path.read_text()
    head = page[page.index("id=\"headline\""):]
    head = head[:head.index("</table>")]
    assert head.count("<tr") == 1 + 6  # header + D, teacher, rand, other, det, errors
    for word in ("rand", "det", "errors", "63.3", "43.7"):  # sets and the paper's numbers
        assert word in head
    srcs = re.findall(r"src='([^']*)'", page)
    assert len(srcs) == len(FIGURES) and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:  # every inlined image decodes
        img = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
        img.load()
        assert img.width > 200 and img.height > 100
    assert "href=" not in page and "<script" not in page  # self-contained, nothing to fetch
    for key in (plan.source.key, plan.run.key, plan.constructs["det"].key):
        assert key in page  # timings and keys
    md = (folder / "report.md").read_text()
    for ref in re.findall(r"\]\((figures/[^)]+)\)", md):
        assert (folder / ref).is_file()
    assert "## Environment" in md and "torch" in md


def test_det_confusion_is_the_predictions_and_is_recomputed_for_old_evals(tiny_run):
    from pipeline import report_data as D
    from pipeline.stages import load_model, load_split

    st, plan, _, folder, _, _ = tiny_run
    info = D.load_run(st, folder)
    counts, classes, n = D.confusion(st, info, "det")
    dets = [s for s in plan.students if s.kind == "det"]
    assert n == len(dets) == 2 and len(classes) == 10
    x, y = load_split(st, plan.dataset.key, "test")
    expect = np.zeros((10, 10), np.int64)
    for s in dets:
        pred = load_model(st, s.student.key)(torch.from_numpy(x).float() / 255).argmax(1).numpy()
        np.add.at(expect, (y, pred), 1)
        m = st.manifest("evals", s.eval.key)["metrics"]
        assert np.trace(np.asarray(m["confusion"])) == m["correct_xy"]
    assert np.array_equal(counts, expect)
    for s in dets:  # an evaluation stored before confusion matrices were kept
        man = st.manifest("evals", s.eval.key)
        del man["metrics"]["confusion"]
        atomic_write_json(st.path("evals", s.eval.key) / "manifest.json", man)
    assert np.array_equal(D.confusion(st, info, "det")[0], expect)


def test_confusion_matrix_known_answer():
    from advfeatures.training import accuracy_metrics, confusion_matrix

    y, pred = torch.tensor([0, 1, 2, 2, 1]), torch.tensor([0, 2, 0, 2, 2])
    assert confusion_matrix(pred, y, 3) == [[1, 0, 0], [0, 0, 2], [1, 0, 1]]
    m = accuracy_metrics(pred, y, 3)
    assert m["correct_xy"] == 2 and m["correct_xy1"] == 3 and m["confusion"][1][2] == 2


def test_intervals_headline_and_example_rows_known_answers():
    from pipeline import report_data as D
    from pipeline.figures import set_intervals
    from pipeline.html_report import headline

    df = pd.DataFrame({"set": ["rand", "rand", "det"], "model": ["m"] * 3, "seed": [0, 1, 0],
                       "acc_xy_%": [50.0, 60.0, 30.0], "acc_xy+1_%": [1.0, 3.0, 40.0], "ci95_lo_%": [0, 0, 25.0],
                       "ci95_hi_%": [0, 0, 35.0], "paper_%": [63.3, 63.3, 43.7], "chance_%": [10.0] * 3,
                       "fooled_whole_set_%": [80.0, 80.0, 70.0], "fooled_whole_set_t≠y_%": [78.0, 78.0, 70.0],
                       "fooled_trained_rows_%": [100.0] * 3, "fooled_trained_rows_t≠y_%": [100.0] * 3,
                       "trained_rows_%": [40.0] * 3, "vs_chance": ["above"] * 3})
    iv = set_intervals(df).set_index("set")
    half = np.tan(0.475 * np.pi) * np.std([50, 60], ddof=1) / np.sqrt(2)  # t(0.975, 1) = tan(pi (p - 1/2)) (Cauchy)
    assert iv.loc["rand", "mean"] == 55 and iv.loc["rand", "lo"] == pytest.approx(55 - half)
    assert (iv.loc["det", "lo"], iv.loc["det", "hi"]) == (25.0, 35.0)  # one seed: its Wilson interval
    h = headline(df).set_index("set")
    # clipped to [0, 100]; with two seeds, why it is that wide
    assert h.loc["rand", "95% interval"] == f"0.0 – {min(55 + half, 100):.1f} (n=2: t=12.7)"
    assert h.loc["det", "95% interval"] == "25.0 – 35.0"
    assert h.loc["rand", "acc (X, Y+1) %"] == 2.0 and h.loc["det", "paper %"] == 43.7
    rec = {"y_target": np.array([0, 1, 2, 3, 4, 5]), "y_true": np.array([0, 0, 1, 1, 2, 2]),
           "fooled": np.array([True, False, True, True, False, True])}
    assert list(D.example_rows(rec, 2)) == [2, 5]  # t != y and fooled (rows 2, 3, 5), one per true class
    assert list(D.example_rows(rec, 3)) == [2, 3, 5]  # then the pool's next rows
    assert list(D.example_rows({**rec, "fooled": np.zeros(6, bool)}, 3)) == [1, 2, 4]  # none fooled: t != y


def test_report_of_other_experiments_and_bad_folders(tmp_path, tiny_tar, tiny_run):
    """errors-sweep and a sweep folder get their own figure; a folder that is no run is refused."""
    from pipeline import sweep as S
    from pipeline.html_report import write_report
    from pipeline.report_data import resolve_run
    from storage.store import StoreError

    st, _, cfg, folder, _, _ = tiny_run
    ecfg = resolve("tiny", ["errors_sweep.teacher_epochs=[1]", "construct.sets=[errors]"], data=str(tiny_tar),
                   store=str(st.root))
    eplan = get("errors-sweep").plan(ecfg, source_sha256(tiny_tar))
    kinds.run_all(st, eplan, Context(runtime=ecfg.runtime, data=ecfg.data, plan=eplan, config=ecfg,
                                     experiment="errors-sweep"))
    epage = write_report(st, st.path("runs", eplan.run.key)).read_text()
    assert "errors_curve" in epage and "teacher_epochs" in epage
    sweep_dir = S.write_sweep(st, "replicate", [("attack.steps", ["3", "3b"])], [(["attack.steps=3"], folder),
                                                                                 (["attack.steps=3b"], folder)], cfg)
    spage = write_report(st, sweep_dir).read_text()
    assert "alt='sweep'" in spage and "id=\"points\"" in spage
    assert resolve_run(None, str(folder))[1] == folder
    assert resolve_run(st, folder.name)[1] == folder
    with pytest.raises(StoreError, match="neither a finished run folder"):
        resolve_run(st, str(tmp_path))


def test_progress_events_arrive_and_change_nothing(tiny_run, tmp_path, tiny_tar):
    """Every kind of event is emitted; a PGD set made with a sink that records every event is
    byte-identical to one made with no sink at all."""
    from conftest import build

    from pipeline import stages
    from storage import arrays as A

    st, plan, cfg, _, _, events = tiny_run
    kinds_seen = {e["event"] for e in events}
    assert {"epoch", "pgd_set", "pgd_batch", "shard_done"} <= kinds_seen
    shards = [e for e in events if e["event"] == "shard_done" and e["key"] == plan.constructs["rand"].key]
    assert [e["shards_done"] for e in shards] == [1, 2] and all(e["image_steps_per_s"] > 0 for e in shards)
    epochs = [e for e in events if e["event"] == "epoch" and e["key"] == plan.source.key]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[-1]["train_loss"] == st.manifest("models", plan.source.key)["history"][-1]["train_loss"]
    _, bare, bplan = build(tiny_tar, tmp_path, ["construct.select=0.5", "student.seeds=[0, 1]",
                                                "construct.n_images=100"])
    stages.generate(bare, bplan.constructs["rand"], cfg.runtime)  # no sink
    a = A.read_rows(st.path("constructed", plan.constructs["rand"].key))
    b = A.read_rows(bare.path("constructed", bplan.constructs["rand"].key))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert (st.path("models", plan.source.key) / "weights.pt").read_bytes() == \
        (bare.path("models", bplan.source.key) / "weights.pt").read_bytes()


def test_progress_displays_and_a_failing_sink():
    from rich.console import Console

    out = io.StringIO()
    plain = progress.PlainSink(out)
    evs = [{"event": "plan", "labels": {"k1": "source"}, "total": 4, "done": 1, "cached": 2, "pending": 1,
            "current": "model source"},
           {"event": "pgd_set", "key": "k2", "kind": "rand", "rows": 100, "shards": 2, "total_shards": 2},
           {"event": "pgd_batch", "key": "k2", "shard": 0, "rows_done": 25, "shard_rows": 50, "image_steps": 250,
            "seconds": 0.1},
           {"event": "shard_done", "key": "k2", "kind": "rand", "shard": 0, "total_shards": 2, "shards_done": 1,
            "rows": 50, "steps": 10, "seconds": 0.5, "image_steps_per_s": 1000.0},
           {"event": "epoch", "stage": "model", "key": "k1", "epoch": 1, "epochs": 2, "train_loss": 1.5,
            "train_acc": 0.4, "seconds": 1.0, "lr": 0.1}]
    for e in evs:
        plain(e)
    text = out.getvalue()
    assert "1 done, 2 cached, 1 pending of 4, now: model source" in text
    assert "shard 1 done (1/2 shards), 1,000 image-steps/s, ETA" in text and "epoch" not in text
    con = Console(file=io.StringIO(), force_terminal=True, width=120)
    with progress.RichSink(con) as rich_sink:
        for e in evs:
            rich_sink(e)
        rich_sink.progress.refresh()
    shown = con.file.getvalue()
    assert "PGD rand" in shown and "image-steps/s" in shown and "loss 1.500" in shown and "2 cached" in shown
    assert isinstance(progress.auto_sink("auto"), progress.PlainSink)  # pytest's stdout is no terminal

    def broken(_ev):
        raise RuntimeError("display gone")

    progress.add_sink(broken)
    progress.emit(evs[0])  # does not raise, and removes the sink
    assert broken not in progress._sinks
    from tasks.progress import artifact_of

    assert artifact_of(evs[3])[:2] == ("pgd-k2", 50.0) and artifact_of(evs[4])[:2] == ("train-k1", 50.0)
    assert artifact_of({**evs[0], "run": "r1"})[:2] == ("stages-r1", 75.0) and artifact_of(evs[2]) is None


def test_progress_artifacts_are_updated_at_most_once_a_second_and_always_at_100(monkeypatch):
    """Each artifact update is an API call: a burst of events (cached stages, tiny runs) sends the
    first, then at most one a second, and the last (100%) always."""
    import tasks.progress as P

    calls, clock = [], [0.0]
    monkeypatch.setattr(P, "_run_id", lambda: "run1")
    monkeypatch.setattr(P, "create_progress_artifact", lambda pct, **kw: calls.append(("create", pct)) or "a1")
    monkeypatch.setattr(P, "update_progress_artifact", lambda art, pct, **kw: calls.append((art, pct)))
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    sink = P.PrefectProgress(min_interval=1.0)

    def epoch(i, at):
        clock[0] = at
        sink({"event": "epoch", "key": "k", "stage": "source", "epoch": i, "epochs": 4, "train_loss": 1.0,
              "train_acc": 0.5})

    epoch(1, 0.0)  # created
    epoch(2, 0.5)  # within the second: skipped
    epoch(3, 1.2)  # 1.2 s after the last sent: sent
    epoch(4, 1.3)  # 100%: sent although 0.1 s after the last
    assert calls == [("create", 25.0), ("a1", 75.0), ("a1", 100.0)]
    sink({"event": "epoch", "key": "k2", "stage": "source", "epoch": 1, "epochs": 4, "train_loss": 1.0,
          "train_acc": 0.5})  # another artifact has its own clock
    assert calls[-1] == ("create", 25.0)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="needs headless Chromium (Debian: apt-get install chromium; "
                                                 ".ci/run installs it)")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    """~5 s. The page as a browser sees it: every image decoded (naturalWidth > 0), the tables'
    rows present, nothing fetched, and a screenshot that is not blank."""
    _, _, _, folder, html_path, _ = tiny_run
    probe = tmp_path / "probe.html"
    check = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.body.dataset.images=i.length;"
             "document.body.dataset.broken=i.filter(x=>!(x.complete&&x.naturalWidth>0)).length;"
             "document.body.dataset.rows=document.querySelectorAll('#headline tr').length;"
             "document.body.dataset.resources=performance.getEntriesByType('resource').length;});</script>")
    probe.write_text(html_path.read_text().replace("</body>", check + "</body>"))
    base = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=5000"]
    dom = subprocess.run(base + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', dom[dom.index("<body"):dom.index(">", dom.index("<body"))]))
    assert attrs == {"images": str(len(FIGURES)), "broken": "0", "rows": "7", "resources": "0"}, attrs
    shot = tmp_path / "shot.png"
    subprocess.run(base + ["--window-size=1200,1600", f"--screenshot={shot}", html_path.as_uri()],
                   capture_output=True, timeout=120, cwd=tmp_path)
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (1600, 1200) and img.std() > 10  # tables and figures, not a blank page


def test_t_interval_known_answers():
    """t(0.975, n-1) exactly, for any n: the hand-typed table it replaced stopped at n = 31 and
    fell back to the normal quantile 1.96 beyond."""
    from pipeline.report import t_interval

    lo, hi = t_interval(pd.Series([1.0, 2.0, 3.0]))  # mean 2, std 1
    half = 0.95 * (2 / (4 * 0.975 * 0.025)) ** 0.5 / 3 ** 0.5  # t(0.975, 2) = (2p-1) sqrt(2 / (4p(1-p)))
    assert abs(lo - (2 - half)) < 1e-9 and abs(hi - (2 + half)) < 1e-9
    values = pd.Series(np.arange(40, dtype=float))  # std sqrt(40 * 41 / 12), t(0.975, 39) by mpmath's findroot
    half = 2.0226909200367611 * (40 * 41 / 12) ** 0.5 / 40 ** 0.5
    lo, hi = t_interval(values)
    assert abs(lo - (19.5 - half)) < 1e-9 and abs(hi - (19.5 + half)) < 1e-9
    assert all(np.isnan(t_interval(pd.Series([5.0, np.nan]))))  # n counts values, not NaNs


def test_fooling_over_the_whole_set_and_over_the_trained_rows_known_answer(tmp_path):
    """A stub PGD set of 10 rows: t = y on rows 0-1 (fooled for free), t != y on rows 2-9, of which
    2-5 fool the source: 60% of all rows, 50% of rows with t != y. A margin selection of half of
    each stratum keeps rows 0 and 2-5, every one fooled. The table and the headline give the whole
    set's rates and the trained rows' (100%) under names that say which is which; a table of an
    older run (one attack_success column, over the trained rows) gets both from the store."""
    from pipeline.common import save_set
    from pipeline.html_report import fooling_note, headline, trained_rows_label
    from pipeline.kinds import StageSpec
    from pipeline.report import FOOLING, _row, fooling, with_fooling
    from pipeline.stages import select_rows

    st = Store(tmp_path)
    n = 10
    y_true = np.arange(n) % 10
    y_target = np.where(np.arange(n) < 2, y_true, (y_true + 1) % 10)
    fooled = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
    margin = np.array([5, -1, 4, 3, 2, 1, -1, -2, -3, -4], np.float32)
    rows = {"x": np.zeros((n, 3, 2, 2), np.float16), "y_target": y_target, "y_true": y_true,
            "index": np.arange(n), "fooled": fooled, "loss": np.ones(n, np.float32),
            "norm": np.ones(n, np.float32), "margin": margin}
    parent = StageSpec("construct", {"kind": "rand", "stub": True}, ("d" * 16, "s" * 16))
    from pipeline.stages.construct import attack_summary

    save_set(st, parent, rows, [str(i) for i in range(10)], attack_summary(rows), {}, 0.0)
    sel = StageSpec("select", {"fraction": 0.5, "by": "target_margin", "strata": "t==y"}, (parent.key, "s" * 16))
    select_rows(st, sel)
    man = st.manifest("constructed", sel.key)
    assert man["summary"]["n"] == 5 and man["summary"]["attack_success"] == 1.0  # rows 0, 2, 3, 4, 5

    want = {"fooled_whole_set_%": 60.0, "fooled_whole_set_t≠y_%": 50.0, "fooled_trained_rows_%": 100.0,
            "fooled_trained_rows_t≠y_%": 100.0, "trained_rows_%": 50.0}
    assert fooling(st, man) == want
    assert fooling(st, st.manifest("constructed", parent.key)) == {  # a set trained on whole
        **want, "fooled_trained_rows_%": 60.0, "fooled_trained_rows_t≠y_%": 50.0, "trained_rows_%": 100.0}
    assert all(np.isnan(v) for v in fooling(st, None).values())  # models trained on D

    class Manifests:  # the set's manifests from the store, a student's and its evaluation's stubbed
        def manifest(self, folder, key):
            if folder == "constructed":
                return st.manifest(folder, key)
            if folder == "models":
                return {"seeds": {"train": 0}, "n_train": 5, "init_sha256": key}
            return {"metrics": {"acc_xy": 0.5, "ci95_xy": [0.45, 0.55], "acc_xy1": 0.1, "chance": 0.1,
                                "n_test": 100}}

    def spec(stage, seed):
        return StageSpec(stage, {"model": {"arch": "stub"}, "seed": seed})

    df = pd.DataFrame([_row(Manifests(), "rand", spec("student", s), spec("eval", s), {**man, "key": sel.key}, 0.9)
                       for s in (0, 1)])
    assert {k: df[k].tolist() for k in FOOLING} == {k: [v, v] for k, v in want.items()}
    assert list(df.columns[df.columns.str.startswith("fooled") | (df.columns == "trained_rows_%")]) == list(FOOLING)
    h = headline(df).set_index("set")
    assert h.loc["rand", "source fooled, whole set (all rows) %"] == 60.0
    assert h.loc["rand", "source fooled, trained rows (top 50%) %"] == 100.0
    assert "the top 50% of each set by target margin" in fooling_note(df)
    uneven = df.assign(**{"trained_rows_%": [50.8, 50.0]})  # per-stratum rounding on a small set
    assert trained_rows_label(uneven) == "top share per set" and trained_rows_label(uneven, 0.5) == "top 50%"
    assert trained_rows_label(df.assign(**{"trained_rows_%": 100.0}), 1.0) == "all rows"

    old = df.drop(columns=list(FOOLING))  # the columns as tables had them before
    at = list(df.columns).index(FOOLING[0])
    old.insert(at, "attack_success_t≠y_%", 100.0)
    old.insert(at, "attack_success_%", 100.0)
    old = pd.concat([old, old.assign(construct_key="gone" * 4)], ignore_index=True)  # one set no longer stored
    new = with_fooling(st, old)
    assert "attack_success_%" not in new and list(new.columns) == list(df.columns)
    assert new.loc[:1, list(FOOLING)].to_dict("list") == {k: [v, v] for k, v in want.items()}
    gone = new.loc[2]
    assert gone["fooled_trained_rows_%"] == 100.0 and np.isnan(gone["fooled_whole_set_%"])
    assert with_fooling(st, df) is df


def _collections(ax, prefix):
    return {c.get_gid().split(":", 1)[1]: c for c in ax.collections if (c.get_gid() or "").startswith(prefix)}


def test_table1_draws_every_seed_and_the_t_interval_only_from_three_seeds():
    """Two seeds of rand 1 point apart: their t-interval would be mean +- 12.7 * 0.71 / 1.41
    (+-6.35 points); it is not drawn, each seed's own Wilson interval is (and a note says why).
    Three seeds of det: the t-interval of the mean is drawn, with three dots."""
    from pipeline.figures import table1_bars
    from pipeline.report import t_interval

    df = pd.DataFrame({"set": ["rand", "rand", "det", "det", "det"], "model": ["m"] * 5, "seed": [0, 1, 0, 1, 2],
                       "acc_xy_%": [50.0, 51.0, 30.0, 31.0, 33.0], "ci95_lo_%": [49.0, 50.0, 29.0, 30.0, 32.0],
                       "ci95_hi_%": [51.0, 52.0, 31.0, 32.0, 34.0], "paper_%": [63.3, 63.3, 43.7, 43.7, 43.7],
                       "chance_%": [10.0] * 5, "acc_xy+1_%": [1.0] * 5})
    fig = table1_bars(df)
    ax = fig.axes[0]
    dots = _collections(ax, "seeds:")
    assert sorted(dots) == ["det", "rand"]
    assert sorted(dots["rand"].get_offsets()[:, 1]) == [50.0, 51.0] and len(dots["det"].get_offsets()) == 3
    t_bars, wilson = _collections(ax, "t-interval:"), _collections(ax, "wilson:")
    assert list(t_bars) == ["det"] and list(wilson) == ["rand"]
    (seg,) = t_bars["det"].get_segments()
    assert sorted(seg[:, 1]) == pytest.approx(t_interval(df["acc_xy_%"][2:]))
    assert sorted(tuple(sorted(s[:, 1])) for s in wilson["rand"].get_segments()) == [(49.0, 51.0), (50.0, 52.0)]
    rand_x = dots["rand"].get_offsets()[:, 0]
    for c in ax.collections:  # nothing over rand's bar reaches beyond its seeds' own intervals
        for s in getattr(c, "get_segments", lambda: [])():
            if rand_x.min() - 0.1 <= s[:, 0].mean() <= rand_x.max() + 0.1:
                assert s[:, 1].min() >= 49.0 and s[:, 1].max() <= 52.0
    notes = [t for t in ax.texts if t.get_gid() == "note:n=2"]
    assert len(notes) == 1 and "12.7" in notes[0].get_text()
    three = table1_bars(df[df["set"] == "det"]).axes[0]
    assert list(_collections(three, "t-interval:")) == ["det"] and not [t for t in three.texts if t.get_gid()]


def test_report_is_drawn_again_only_when_what_it_shows_changed(tiny_run, tmp_path, monkeypatch):
    """report.json records what the report was drawn from: ``if_changed`` leaves a report of the
    same folder files and report code as it is (a cached rerun: no figure drawn), and draws it
    again when a table or the config changed, when one of its files is gone, or when the report's
    code changed."""
    from pipeline import html_report
    from pipeline import report_data as D

    st, _, _, folder, _, _ = tiny_run
    assert D.report_is_current(folder)
    copy = tmp_path / folder.name  # the run folder elsewhere; its artifacts still in st
    shutil.copytree(folder, copy)
    calls = []
    real_build = html_report.build
    monkeypatch.setattr(html_report, "build", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    assert D.report_is_current(copy)
    assert html_report.write_report(st, copy, if_changed=True) == copy / "report.html" and calls == []
    with (copy / "config.yaml").open("a") as f:
        f.write("# edited\n")
    assert not D.report_is_current(copy)
    html_report.write_report(st, copy, if_changed=True)
    assert calls == [1] and D.report_is_current(copy)
    html_report.write_report(st, copy, if_changed=True)
    assert calls == [1]
    # what else makes it stale, checked without drawing again (a draw is 5-9 s here): the fingerprint
    # moves with a table, a report file gone, a module that draws reports appearing or changing
    table = copy / "table.parquet"
    saved = table.read_bytes()
    df = pd.read_parquet(table)
    df.loc[0, "acc_xy_%"] += 1
    df.to_parquet(table, index=False)
    assert not D.report_is_current(copy)
    table.write_bytes(saved)
    assert D.report_is_current(copy)
    svg = copy / "figures" / "table1.svg"
    kept = svg.read_bytes()
    svg.unlink()
    assert not D.report_is_current(copy)
    svg.write_bytes(kept)
    assert D.report_is_current(copy)
    code, real_code = tmp_path / "experiment.py", D.report_code()
    before = D.report_fingerprint(copy)
    code.write_text("# a report section\n")
    monkeypatch.setattr(D, "report_code", lambda: [*real_code, code])
    appeared = D.report_fingerprint(copy)
    assert appeared != before and not D.report_is_current(copy)  # a module that draws reports appeared
    code.write_text("# a report section, changed\n")
    assert D.report_fingerprint(copy) not in (before, appeared)
    html_report.write_report(st, copy)  # without if_changed: always drawn
    assert calls == [1, 1] and D.report_is_current(copy)


def test_nested_stats_known_answer_sources_by_students():
    """3 sources x 2 students: the headline is the mean of the source means, its interval a
    t-interval over the 3 source means (not over the 6 students, which would be narrower), the
    between spread the std of the source means, the within spread the pooled std around each
    source's mean."""
    from pipeline.report import nested_stats, summarize, to_markdown

    acc = {0: (50.0, 52.0), 1: (60.0, 60.0), 2: (40.0, 43.0)}  # source means 51, 60, 41.5
    df = pd.DataFrame([{"set": "det", "model": "m", "source_seed": s, "seed": k, "acc_xy_%": a, "acc_xy+1_%": 1.0,
                        "init": f"{s}{k}"} for s, pair in acc.items() for k, a in enumerate(pair)])
    got = nested_stats(df)
    means = np.array([51.0, 60.0, 41.5])
    half = 4.302652729911275 * means.std(ddof=1) / 3 ** 0.5
    assert got["n_sources"] == 3 and got["mean"] == pytest.approx(means.mean())
    assert got["between_std"] == pytest.approx(means.std(ddof=1))
    assert got["within_std"] == pytest.approx(((1 + 1 + 0 + 0 + 2.25 + 2.25) / 3) ** 0.5)  # 3 dof
    assert (got["ci95_lo"], got["ci95_hi"]) == pytest.approx((means.mean() - half, means.mean() + half))
    row = summarize(df).iloc[0]
    assert row["n"] == 6 and row["n_sources"] == 3 and row["acc_xy_ci95_lo"] == pytest.approx(means.mean() - half)
    assert "Over sources x students" in to_markdown(df.assign(n_test=1))
    one = df[df["source_seed"] == 0]
    assert "acc_xy_std" in summarize(one) and "n_sources" not in summarize(one)  # one source: over seeds, as before


def test_source_seeds_replicate_the_plan_without_sharing_any_seed(tiny_tar):
    """source.seeds=[0, 1, 2]: the first source's stages are a one-source run's; the others have
    their own source, set, teacher and student seeds (no two models share initial-weight seeds);
    experiments with one source refuse the setting."""
    from advfeatures.config import ConfigError

    sha = source_sha256(tiny_tar)
    one = get("controls").plan_of(resolve("tiny", [], data=str(tiny_tar)), sha)
    many = get("controls").plan_of(resolve("tiny", ["source.seeds=[0,1,2]"], data=str(tiny_tar)), sha)
    assert sorted(many.replicates) == [0, 1, 2]
    assert {s.key for s in many.replicates[0].stages() if s.stage != "run"} == \
        {s.key for s in one.stages() if s.stage != "run"}
    models = [n.spec for n in many.nodes() if n.spec.stage in ("model", "student")]
    inits = [m.config["seeds"]["init"] for m in models]
    assert len(inits) == len(set(inits)) == 3 * len([s for s in one.stages() if s.stage in ("model", "student")])
    sets = {n.tags["source_seed"]: n.spec.config["seed"] for n in many.find(role="set", set="det")}
    assert len(set(sets.values())) == 3 and sets[0] == 0
    assert {n.tags["source_seed"] for n in many.find(role="source")} == {0, 1, 2}
    assert len(many.run.inputs) == 3 * len(one.run.inputs)
    with pytest.raises(ConfigError, match="one source"):
        get("transfer").plan_of(resolve("transfer", ["source.seeds=[0,1]"], data=str(tiny_tar)), sha)
