import os

import pytest

from irr_callback.outputs.plotting import markdown_table, pareto_front, pareto_plot


ROWS = [
    {"method": "a", "safety": 0.9, "utility": 0.2},
    {"method": "b", "safety": 0.5, "utility": 0.8},
    {"method": "c", "safety": 0.4, "utility": 0.7},  # dominated by b
    {"method": "d", "safety": 0.95, "utility": 0.1},
    {"method": "e", "safety": None, "utility": 0.9},
]


def test_pareto_front_drops_dominated_and_missing():
    front = pareto_front(ROWS, "safety", "utility")
    assert [r["method"] for r in front] == ["b", "a", "d"]


def test_markdown_table():
    table = markdown_table(ROWS[:2] + ROWS[4:], ["method", "safety", "utility"])
    assert table.splitlines()[0] == "| method | safety | utility |"
    assert "| a | 0.900 | 0.200 |" in table and "| e | - | 0.900 |" in table


def test_pareto_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional [plot] extra")
    path = pareto_plot(ROWS, str(tmp_path / "p.png"), x="safety", y="utility")
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000
