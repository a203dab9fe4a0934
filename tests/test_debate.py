"""debate: the union of the other experiments' plans (shared stages once), per-experiment
overrides, and the evidence table's sides decided from known numbers."""

import numpy as np
import pandas as pd
import pytest

from conftest import run_experiment
from advfeatures.config import ConfigError, resolve
from pipeline.experiments import all_experiments, get
from pipeline.experiments import debate as DB
from pipeline.experiments import robust_datasets as RD
from pipeline.readings import READINGS
from pipeline.stages import source_sha256

BUGS = "{attack: {eps: 2.5, step_size: 0.5, steps: 3, use_best: false}, bugs_only: {ensemble: 2}}"
OVERRIDES = ["construct.n_images=60", "transfer.archs=[small_cnn,mlp,resnet9_narrow]", "spectrum.eps=[0,0.5]",
             "spectrum.sets=[det]", "spectrum.steps=2", "spectrum.robust_eps=[0.25]", "evaluate.robust_steps=3",
             "robust_datasets.steps=6", "robust_datasets.n_images=60", "robust_datasets.adversarial.steps=2",
             "robust_datasets.robust_eps=[0.25]", "poison.attack.steps=4", f"debate.overrides={{bugs-only: {BUGS}}}"]


def test_the_plan_is_the_union_with_shared_stages_once(tiny_tar):
    cfg = resolve("tiny", OVERRIDES, data=str(tiny_tar))
    sha = source_sha256(tiny_tar)
    plan = get("debate").plan(cfg, sha)
    keys = [s.key for s in plan.stages()]
    assert len(keys) == len(set(keys))
    parts = DB.parts(cfg, sha)
    assert [p[0] for p in parts] == list(DB.PARTS)
    for name, sub, p in parts:  # every stage of every experiment, once
        assert {s.key for s in p.stages() if s.stage != "run"} <= set(keys), name
    assert sum(len(p.nodes()) for _, _, p in parts) > len(plan.nodes())  # shared: the source, det, ...
    rep = dict((n, p) for n, _, p in parts)
    assert rep["replicate"].source.key == rep["spectrum"].source.key == rep["transfer"].source.key
    assert rep["replicate"].constructs["det"].key == rep["poison"].constructs["det"].key
    # the override is bugs-only's alone: its det is made with eps 2.5, everyone else's with the profile's
    assert rep["bugs-only"].constructs["det"].config["attack"]["eps"] == 2.5
    assert rep["replicate"].constructs["det"].config["attack"]["eps"] == 0.5
    assert rep["bugs-only"].source.key == rep["replicate"].source.key
    alone = get("bugs-only").plan(resolve("tiny", OVERRIDES[:1] + ["attack.eps=2.5", "attack.step_size=0.5",
                                                                     "attack.steps=3", "attack.use_best=false",
                                                                     "bugs_only.ensemble=2"], data=str(tiny_tar)), sha)
    assert {s.key for s in alone.stages() if s.stage != "run"} <= set(keys)  # as when bugs-only runs alone
    assert "debate" in all_experiments()


def test_bad_debate_settings_fail_before_anything_runs(tiny_tar):
    sha = source_sha256(tiny_tar)
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        get("debate").plan(resolve("tiny", ["debate.experiments=[replicate,nope]"]), sha)
    with pytest.raises(ConfigError, match=r"debate.overrides.bugs-only: unknown setting attack.epz"):
        get("debate").plan(resolve("tiny", ["debate.overrides={bugs-only: {attack: {epz: 1}}}"]), sha)
    with pytest.raises(ConfigError, match="not in debate.experiments"):
        resolve("tiny", ["debate.experiments=[replicate]", "debate.overrides={poison: {}}"])
    with pytest.raises(ConfigError, match="cannot hold debate"):
        resolve("tiny", ["debate.experiments=[debate]"])


def _table1(rows, xy1=None):
    xy1 = xy1 or {}
    return pd.DataFrame([{"set": s, "seed": i, "acc_xy_%": a, "ci95_lo_%": a - 1, "ci95_hi_%": a + 1, "chance_%": 10.0,
                          "acc_xy+1_%": xy1.get(s, [5.0] * len(accs))[i]}
                         for s, accs in rows.items() for i, a in enumerate(accs)])


def test_readings_follow_the_intervals_not_the_point_values():
    lines = {r["line"].split()[0]: r for r in DB._replicate_lines("controls", _table1({
        "det": [40.0, 41.0, 42.0], "leak-det": [6.0, 6.5, 6.0], "clean-det": [20.0, 21.0, 22.0],  # above every control
        "other": [20.0, 21.0, 19.0], "leak-other": [25.0, 24.0, 26.0],  # above chance, below its control
        "rand": [9.0, 11.0, 10.0],                                       # chance
        "errors": [30.0, 31.0, 29.0]}), 10.0)}
    assert [lines[k]["supports"] for k in ("rand", "other", "det", "errors")] == ["neither", "neither", "features",
                                                                                 "neither"]
    assert lines["det"]["control"] == "leak-det 6.2; clean-det 21.0; (X, Y+1) 5.0"
    assert lines["det"]["reference"] == "paper 43.7" and "det - clean-det = +20.0 [20.0, 20.0]" in lines["det"]["why"]
    assert lines["det"]["ours"] == "41.0 ± 1.0 (n=3) [38.5, 43.5]"
    # the row-matched control reaches det: not features, whatever the leak control says
    matched = DB._replicate_lines("controls", _table1({"det": [40.0, 41.0, 42.0], "leak-det": [6.0, 6.5, 6.0],
                                                       "clean-det": [41.0, 40.0, 42.5]}), 10.0)[0]
    assert matched["supports"] == "neither" and "clean-det" in matched["why"]
    # the base recipe of the old debate: det below chance with (X, Y+1) high, other below chance, rand at chance
    weak = {r["line"].split()[0]: r["supports"] for r in DB._replicate_lines("controls", _table1(
        {"rand": [14.5, 12.0, 17.0], "other": [4.4, 4.3, 4.5], "det": [6.0, 5.9, 6.1]},
        {"det": [63.0, 63.2, 63.4]}), 10.0)}
    assert weak == {"rand": "neither", "other": "inconclusive: recipe too weak", "det": "inconclusive: recipe too weak"}
    # one student: its own binomial interval decides
    one = DB._replicate_lines("replicate", _table1({"det": [10.5]}), 10.0)[0]
    assert one["supports"] == "neither" and one["ours"] == "10.5 (n=1) [9.5, 11.5]"

    bugs = pd.DataFrame([{"set": s, "seed": i, "acc_xy_%": a, "ci95_lo_%": a - 1, "ci95_hi_%": a + 1,
                          "acc_xy+1_%": b, "transfer_%": t} for s, i, a, b, t in
                         (("det", 0, 31.0, 18.0, 81.6), ("det", 1, 32.0, 17.0, 81.6),
                          ("bugs-only", 0, 7.5, 58.0, 1.8), ("bugs-only", 1, 7.8, 56.0, 1.8))])
    (line,) = DB._bugs_only_lines("bugs-only", bugs, 10.0)
    assert line["supports"] == "bugs" and "transfer 1.8" in line["control"]
    taught = bugs.assign(**{"acc_xy_%": 30.0})
    assert DB._bugs_only_lines("bugs-only", taught, 10.0)[0]["supports"] == "neither"
    weak_det = bugs.assign(**{"acc_xy_%": [8.0, 9.0, 7.5, 7.8]})
    assert DB._bugs_only_lines("bugs-only", weak_det, 10.0)[0]["supports"] == "inconclusive: recipe too weak"

    rd = pd.DataFrame([{"model": m, "seed": s, "acc_%": a, "ci95_lo_%": a - 1, "ci95_hi_%": a + 1, "robust_0.25_%": r}
                       for m, s, a, r in (("source", None, 77.0, 15.0), ("D_R", 0, 45.0, 21.0), ("D_R", 1, 44.8, 21.4),
                                          ("D_NR", 0, 28.2, 4.5), ("D_NR", 1, 27.1, 6.1))])
    nr, dr = DB._robust_datasets_lines("robust-datasets", rd, 10.0)
    assert nr["supports"] == "features" and dr["supports"] == "features" and dr["ours_%"] == pytest.approx(21.2)
    same = rd.assign(**{"robust_0.25_%": 5.0})
    assert DB._robust_datasets_lines("robust-datasets", same, 10.0)[1]["supports"] == "neither"
    standard_more = rd.assign(**{"robust_0.25_%": [28.9, 21.0, 21.4, 4.5, 6.1]})  # the committed table's case
    assert DB._robust_datasets_lines("robust-datasets", standard_more, 10.0)[1]["supports"] == "neither"
    # read at the smallest radius where standard training (D's students) keeps <= 5%, whatever D_R
    # does at the others: here 0.5, where D_R (13.5) is clearly above D (4.0) and D_NR (0.1)
    two = pd.DataFrame([{"model": m, "seed": i, "acc_%": 60.0, "ci95_lo_%": 59.0, "ci95_hi_%": 61.0,
                         "robust_0.25_%": a, "robust_0.5_%": b}
                        for m, vals in (("D", ((29.0, 3.8), (29.5, 4.1), (29.8, 4.0))),
                                        ("D_R", ((30.0, 13.4), (31.0, 13.7), (30.5, 13.5))),
                                        ("D_NR", ((5.0, 0.0), (5.5, 0.1), (4.8, 0.2))))
                        for i, (a, b) in enumerate(vals)])
    assert RD.reading_radius(two) == "robust_0.5_%"
    nr, dr = DB._robust_datasets_lines("robust-datasets", two, 10.0)
    assert dr["supports"] == "features" and dr["ours_%"] == pytest.approx(13.53, abs=0.01)
    assert "L2 0.5" in dr["line"] and "rebuild 19.2" in dr["reference"], dr
    assert RD.signature(two)[0] == "features"
    # standard training robust at every radius: the largest is read; both at or below 5%: the smallest
    assert RD.reading_radius(two.assign(**{"robust_0.5_%": 20.0})) == "robust_0.5_%"
    assert RD.reading_radius(two.assign(**{"robust_0.25_%": 1.0})) == "robust_0.25_%"

    tr = pd.DataFrame({"arch": list("abcde"), "set": "det", "seed": 0, "transfer_%": [10.0, 20.0, 30.0, 40.0, 50.0],
                       "acc_xy_%": [15.0, 25.0, 35.0, 44.0, 56.0], "acc_xy+1_%": 0.0})
    (line,) = DB._transfer_lines("transfer", tr, 10.0)
    assert line["supports"] == "features" and line["ours_%"] == pytest.approx(100 * np.corrcoef([10, 20, 30, 40, 50], [15, 25, 35, 44, 56])[0, 1])
    assert DB._transfer_lines("transfer", tr.iloc[:3], 10.0)[0]["supports"] == "neither"  # 3 architectures
    assert DB._transfer_lines("transfer", tr.assign(**{"acc_xy_%": [56.0, 15.0, 44.0, 25.0, 35.0]}), 10.0)[0][
        "supports"] == "neither"

    sp = pd.DataFrame([{"set": "det", "source_eps": e, "source_seed": s, "seed": 0, "acc_xy_%": a + s,
                        "ci95_lo_%": a + s - 1, "ci95_hi_%": a + s + 1} for s in (0, 1, 2)
                       for e, a in ((0.0, 30.0), (0.25, 36.0), (0.5, 42.0))])
    assert DB._spectrum_lines("spectrum", sp, 10.0)[0]["supports"] == "features"  # slope 24 on every source
    assert DB._spectrum_lines("spectrum", sp[sp["source_seed"] == 0], 10.0)[0]["supports"] == "neither"  # one seed
    probed = sp.assign(**{"fooled_t≠y_%": 95.0, "probe_transfer_%": [10.0, 11.0, 12.0] * 3})
    assert DB._spectrum_lines("spectrum", probed, 10.0)[0]["supports"] == "features"  # matched, probe flat
    assert DB._spectrum_lines("spectrum", probed.assign(**{"fooled_t≠y_%": [99.0, 95.0, 60.0] * 3}), 10.0)[0][
        "supports"] == "inconclusive: recipe too weak"  # the robust source is rarely fooled: not matched
    line = DB._spectrum_lines("spectrum", probed.assign(**{"probe_transfer_%": [10.0, 30.0, 50.0] * 3}), 10.0)[0]
    assert line["supports"] == "neither" and "probe transfer rise +40.0" in line["control"]
    assert "one student each" in line["ours"] and "nan" not in line["ours"]  # one student per source: no within
    # source seed 2 at chance at eps 0.25: the interval over sources there reaches chance, and the line says where
    low = sp.assign(**{"acc_xy_%": [30.0, 36.0, 42.0, 31.0, 37.0, 43.0, 32.0, 2.0, 44.0]})
    assert "at source eps 0.25 [" in DB._spectrum_lines("spectrum", low, 10.0)[0]["why"]
    flat = sp.assign(**{"acc_xy_%": [30.0, 36.0, 30.0, 30.0, 25.0, 30.0, 31.0, 36.0, 26.0]})
    assert DB._spectrum_lines("spectrum", flat, 10.0)[0]["supports"] == "neither"


def test_a_table_over_sources_reads_its_interval_over_sources_and_pairs_controls_by_source():
    """3 sources x 2 students: det's interval is over the 3 source means; its difference with a
    control is paired by source, so a source effect shared by set and control cancels."""
    rows = []
    for s, shift in ((0, 0.0), (1, 8.0), (2, -8.0)):
        for k in (0, 1):
            for kind, a in (("det", 30.0), ("clean-det", 27.0)):
                rows.append({"set": kind, "source_seed": s, "seed": k, "acc_xy_%": a + shift + 0.1 * k,
                             "ci95_lo_%": 0.0, "ci95_hi_%": 0.0, "acc_xy+1_%": 20.0, "chance_%": 10.0})
    df = pd.DataFrame(rows)
    d = DB.paired_difference(df, "det", "clean-det")
    assert d["n"] == 3 and d["mean"] == pytest.approx(3.0) and d["hi"] - d["lo"] < 1e-9  # paired: no spread
    (line,) = DB._replicate_lines("controls", df, 10.0)
    assert line["supports"] == "features" and "3 sources" in line["ours"]
    assert "[10.2, 49.9]" in line["ours"]  # 30.05 +- 4.303 * 8 / sqrt(3)


@pytest.fixture(scope="module")
def debate_run(experiments_store, tiny_tar):
    return run_experiment("debate", OVERRIDES, experiments_store, tiny_tar)


def test_the_debate_writes_every_experiments_run_and_one_evidence_table(debate_run, tiny_tar):
    from pipeline.report import read_table

    cfg, st, plan = debate_run
    assert st.is_complete("runs", plan.run.key)
    df = read_table(st.path("runs", plan.run.key))
    assert set(df["experiment"]) == {"controls", "robust-datasets", "bugs-only", "transfer", "spectrum", "poison"}
    assert set(df["supports"]) <= set(READINGS) and df["why"].str.len().min() > 20
    for name, sub, p in DB.parts(cfg, source_sha256(tiny_tar)):  # each experiment's own run folder, as alone
        assert st.is_complete("runs", p.run.key), name
    det = df[df["line"].str.startswith("det students")].iloc[0]
    controls = read_table(st.path("runs", det["run_key"]))
    assert det["ours_%"] == pytest.approx(controls[controls["set"] == "det"]["acc_xy_%"].mean())
    assert "leak-det" in det["control"]
    text = (st.path("runs", plan.run.key) / "table.md").read_text()
    assert "Readings: features" in text


def test_the_debate_profile_holds_every_stage_of_the_experiments_cpu_profiles():
    """One store: running the bugs-only, robust-datasets, transfer and spectrum profiles first leaves
    the debate only replicate, controls and poison to compute."""
    sha = "0" * 64
    debate = {s.key for s in get("debate").plan(resolve("debate"), sha).stages()}
    for name in ("bugs-only", "robust-datasets", "transfer", "spectrum"):
        alone = get(name).plan(resolve(name), sha)
        missing = [s.stage for s in alone.stages() if s.stage != "run" and s.key not in debate]
        assert not missing, (name, missing)


def test_the_debates_section_3_2_is_the_demo_profiles_over_three_sources(tiny_tar):
    """The debate's replicate and controls parts are planned exactly as the demo profile's controls
    over source seeds 0-2: `make demo`'s stages are the debate's."""
    sha = source_sha256(tiny_tar)
    parts = {n: p for n, _, p in DB.parts(resolve("debate", data=str(tiny_tar)), sha)}
    demo = get("controls").plan_of(resolve("demo", ["source.seeds=[0,1,2]"], data=str(tiny_tar)), sha)
    assert {s.key for s in parts["controls"].stages()} - {parts["controls"].run.key} == \
        {s.key for s in demo.stages()} - {demo.run.key}
    one = get("replicate").plan(resolve("demo", data=str(tiny_tar)), sha)  # make demo
    assert {s.key for s in one.stages() if s.stage != "run"} <= {s.key for s in parts["replicate"].stages()}


def test_the_debates_poison_is_the_demo_profiles(tiny_tar):
    """`advfeatures run --experiment poison --profile demo` computes the debate's poison part."""
    sha = source_sha256(tiny_tar)
    parts = {n: p for n, _, p in DB.parts(resolve("debate", data=str(tiny_tar)), sha)}
    demo = get("poison").plan(resolve("demo", data=str(tiny_tar)), sha)
    assert {s.key for s in parts["poison"].stages()} - {parts["poison"].run.key} == \
        {s.key for s in demo.stages()} - {demo.run.key}
