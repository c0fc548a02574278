"""DESIGN.md's "Stage boundaries" stays true of the code: no function over 80 lines, no component
outside the wiring modules takes the root Config, no import crosses a boundary the wrong way
(tools/boundaries.py measures all three; at 64adf20 they were 3, 28 and 6)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).parents[2] / "tools" / "boundaries.py"


def survey():
    spec = importlib.util.spec_from_file_location("boundaries", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.survey()


def test_stage_boundaries_hold():
    _, (sizes, long_fns, config_fns, wrong) = survey()
    assert len(sizes) > 500  # it read the package
    assert long_fns == [] and config_fns == [] and wrong == []


def test_the_survey_sees_each_kind_of_breach(tmp_path, monkeypatch):
    module, _ = survey()
    room = tmp_path / "tunewise"
    (room / "data").mkdir(parents=True)
    (room / "data" / "bad.py").write_text(
        "from tunewise.report.data_report import write_data_report\n"
        "def stage(config):\n    return config.data\n"
        "def long():\n" + "    x = 1\n" * 85)
    monkeypatch.setattr(module, "ROOT", room)
    _, long_fns, config_fns, wrong = module.survey()
    assert long_fns == ["data/bad.py::long (86 lines)"] and config_fns == ["data/bad.py::stage"]
    assert wrong == ["data/bad.py imports tunewise.report.data_report"]
