"""The report's parts as plain dicts, numbers as cells, and the perplexity table layout."""

import math

import pytest

from lingregion import markup


def test_numbers_and_intervals_as_cells():
    assert markup.fmt(3.14159) == "3.142" and markup.fmt(123456.0) == "1.23e+05"
    assert markup.fmt(math.inf) == "inf" and markup.fmt(math.nan) == "nan"
    assert markup.cell({"value": 3.912, "ci95": [2.81, 5.63]}) == "×3.91 [2.81, 5.63]"
    assert markup.cell({"value": 3.912, "ci95": None}) == "×3.91 [no interval]"


def test_tables_escape_their_cells_and_refuse_ragged_rows():
    assert markup.markdown_table(["a", "b"], [["x|y", "1\n2"]]) == "| a | b |\n|---|---|\n| x\\|y | 1 2 |"
    with pytest.raises(ValueError, match="2 cells"):
        markup.table(["a", "b"], [["only one"]])


def test_perplexity_table_puts_base_first_in_the_papers_layout():
    table = {
        "base": {"ru": {"ppl": 10.0}, "zh": {"ppl": 20.0}},
        "top@0.01": {"ru": {"ppl": 1e6}, "zh": {"ppl": 30.5}},
    }
    head, rows = markup.perplexity_table(table, ["zh", "ru"])
    assert head == ["Language", "Base", "top 0.01"]
    assert rows == [["zh", "20.000", "30.500"], ["ru", "10.000", "1e+06"]]
    head, rows = markup.perplexity_table(table, ["ru"], "ppl", ["top@0.01", "base"])  # a summary's sorted keys
    assert head == ["Language", "top 0.01", "Base"] and rows == [["ru", "1e+06", "10.000"]]
