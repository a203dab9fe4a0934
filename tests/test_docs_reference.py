"""The reference pages cannot drift from the code: docs/settings.md is what the config schema
generates (pipeline.settings_doc), it names every setting, and every command of the CLI's parser is
shown as `advfeatures <command>` in README.md or a page of docs/."""

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ROOT / "docs" / "settings.md"


@pytest.fixture(scope="module")
def generated():
    from pipeline.settings_doc import markdown

    return markdown()


def test_settings_page_is_what_the_schema_generates(generated):
    assert SETTINGS.is_file(), "docs/settings.md is missing: run python -m pipeline.settings_doc"
    assert SETTINGS.read_text() == generated, \
        "docs/settings.md differs from what the config schema gives: run python -m pipeline.settings_doc"


def _names(cls, prefix=""):
    """Every dotted setting of dataclass ``cls``, read from its fields (not from the generator)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "sections" and prefix == "":
            continue
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] \
            if typing.get_origin(tp) in (typing.Union, types.UnionType) else []
        if dataclasses.is_dataclass(tp):
            yield from _names(tp, f"{prefix}{f.name}.")
            continue
        yield f"{prefix}{f.name}"
        for a in inner:  # an optional section (train.adversarial): itself and its fields
            yield from _names(a, f"{prefix}{f.name}.")


def schema_settings():
    import flows  # noqa: F401 - registers the flows' sections (fanout, dask, report)
    import pipeline.experiments  # noqa: F401 - registers the experiments' sections
    from advfeatures import config as C

    names = list(_names(C.ExperimentConfig))
    for section, cls in C.SECTIONS.items():
        names += list(_names(cls, f"{section}."))
    return names


def test_every_setting_is_on_the_settings_page():
    page = SETTINGS.read_text()
    names = schema_settings()
    assert len(names) > 100 and {"attack.eps", "fanout.executor", "dask.address", "spectrum.eps",
                                 "source.train.adversarial.eps", "name"} <= set(names)
    missing = [n for n in names if f"| `{n}` |" not in page]
    assert not missing, f"docs/settings.md lacks {missing}: run python -m pipeline.settings_doc"


def cli_commands(monkeypatch):
    """The subcommands of flows.cli's argparse parser, taken from the parser itself."""
    from flows import cli

    class Built(Exception):
        pass

    def grab(self, *args, **kwargs):
        raise Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(Built) as got:
        cli.main(["experiments"])
    parser = got.value.args[0]
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def test_every_command_is_documented(monkeypatch):
    commands = cli_commands(monkeypatch)
    assert {"run", "show-config", "ls", "gc", "synth"} <= set(commands)
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    missing = [c for c in commands if not re.search(rf"advfeatures {re.escape(c)}\b", text)]
    assert not missing, f"no `advfeatures <command>` in README.md or docs/*.md for {missing}"
