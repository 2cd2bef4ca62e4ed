"""Printed rule terms: those that cannot contribute left out and counted; A, V, A×V in aligned columns."""
from attnrules.pipeline.results import FeatureResult, HeadResult, RuleSetView, RuleTerm
from attnrules.rules.term_table import can_contribute, term_table


def term(rank, key, query, a, v, weight=None, offsets=None):
    return RuleTerm(rank, 1, 2, a, v, query, key, weight, None if offsets is None else 0, offsets)


def test_zero_terms_are_left_out_and_columns_align():
    terms = [term(0, "If", "then", 14.14, 1.0), term(1, "<|endoftext|>", "then", 0.0, 1.0),
             term(2, '" vehicle" (L3.in812)', '" sober" (L3.in77)', -2.5, -0.125)]
    lines, left_out = term_table(terms, "L0H0.0")
    assert left_out == 1 and len(lines) == 3  # header + the two that can fire
    header, *rows = lines
    assert rows[1].startswith('[" vehicle" (L3.in812)] … [" sober" (L3.in77)] → L0H0.0')
    # every column ends where its title ends
    for title, values in (("A", ("14.14", "-2.5")), ("V", ("1", "-0.125")), ("A×V", ("14.14", "0.3125"))):
        end = header.index(title) + len(title)
        assert [r[:end].rstrip().endswith(v) for r, v in zip(rows, values)] == [True, True], title


def test_exact_terms_show_the_importance_and_rotary_terms_that_never_fire_are_left_out():
    lines, left_out = term_table([term(0, "If", "then", 1.0, 0.0, weight=3.5), term(1, "a", "b", 1.0, 1.0, weight=0.0)],
                                 "L0H0.0")
    assert left_out == 1 and lines[0].rstrip().endswith("importance") and lines[1].rstrip().endswith("3.5")
    assert not can_contribute(2.0, 1.0, offsets="none") and can_contribute(2.0, 1.0, offsets="δ=1")
    assert term_table([term(0, "a", "b", 0.0, 1.0)], "x") == ([], 1)


def test_summary_prints_the_table_and_the_count_and_files_keep_every_term(tmp_path):
    terms = (term(0, "If", "then", 14.14, 1.0), term(1, "BOS", "then", 0.0, 1.0), term(2, "x", "then", 0.0, 2.0))
    feature = FeatureResult(0, "L0H0.0", 10, 10, rules=(RuleSetView("weights", 2, terms, ("t0", "t1", "t2")),))
    head = HeadResult(0, 0, (feature,))
    text = head.summary()
    assert "  weights:" in text and "[If] … [then] → L0H0.0  14.14  1  14.14" in text
    assert "(2 of 3 stored terms left out: A×V = 0" in text and "[BOS]" not in text
    head.write(tmp_path)
    assert (tmp_path / "rules.csv").read_text().count("L0H0.0,weights") == 3
