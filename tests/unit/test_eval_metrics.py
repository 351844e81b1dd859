"""The eval metrics on cases whose value is known by hand."""

from __future__ import annotations

import pytest

from vita.eval.metrics import (
    char_error_rate,
    exact_match,
    extract_choice,
    extract_yes_no,
    last_number,
    math_match,
    normalize,
    word_error_rate,
)
from vita.eval.text import _letters, gsm8k_prediction


def test_exact_match_ignores_case_spacing_and_surrounding_punctuation() -> None:
    assert exact_match(" Red.", "red") and exact_match("红色。", "红色") and exact_match("two  beeps", "Two beeps")
    assert not exact_match("dark red", "red") and not exact_match("", "red")
    assert normalize("“Hello”, World!") == "hello world"


def test_word_error_rate_counts_substitutions_deletions_insertions() -> None:
    # ref 6 words; hyp: 1 substitution (cat->hat), 1 deletion (the), 1 insertion (very)
    out = word_error_rate(["The cat sat on the mat.", "hello world"], ["the hat sat on mat", "hello very world"])
    assert out["substitutions"] == 1 and out["deletions"] == 1 and out["insertions"] == 1
    assert out["reference_tokens"] == 8 and out["wer"] == pytest.approx(3 / 8)
    assert word_error_rate(["it's fine"], ["It's fine!"])["wer"] == 0.0
    assert word_error_rate(["a b c"], [""])["wer"] == 1.0  # an empty answer deletes every word


def test_char_error_rate_for_chinese() -> None:
    assert char_error_rate(["今天天气很好。"], ["今天天气很好"])["cer"] == 0.0
    assert char_error_rate(["今天天气很好"], ["今天天很好啊"])["cer"] == pytest.approx(2 / 6)


@pytest.mark.parametrize(("text", "letter"), [
    ("B", "B"), ("(C)", "C"), ("D. Paris", "D"), ("The answer is A.", "A"), ("答案是C", "C"), ("答案：B", "B"),
    ("answer: (d)", "D"), ("I think B is right", "B"), ("", None), ("none of them", None),
    ("b", "B"), ("(b)", "B"), ("c.", "C"), ("Answer: b", "B"), ("a dog", None), ("AC", None),
])
def test_extract_choice(text: str, letter: str | None) -> None:
    assert extract_choice(text) == letter


@pytest.mark.parametrize(("text", "letters"), [
    ("AC", "AC"), ("答案是AC", "AC"), ("答案：A、C", "AC"), ("Answer: CA", "AC"), ("(A)(C)", "AC"), ("A, C", "AC"),
    ("A和C", "AC"), ("The answers are A and C.", "AC"), ("B", "B"), ("b", "B"), ("(b)", "B"), ("Answer: b", "B"),
    ("The answer is A. C is wrong", "A"), ("a dog", ""), ("AE", ""),
])
def test_agieval_letters(text: str, letters: str) -> None:
    assert _letters(text, 4) == letters


@pytest.mark.parametrize(("text", "answer"), [
    ("Yes", "yes"), ("no.", "no"), ("Yes, there is a dog.", "yes"), ("No, it is not.", "no"), ("是的", "yes"),
    ("There is a dog.", None),
])
def test_extract_yes_no(text: str, answer: str | None) -> None:
    assert extract_yes_no(text) == answer


def test_numbers() -> None:
    assert last_number("She pays 1,234.50 then 72.0") == "72"
    assert last_number("no digits") is None
    assert gsm8k_prediction("3 + 4 = 7\n#### 7") == "7"
    assert gsm8k_prediction("so she has 18 dollars") == "18"
    assert gsm8k_prediction("#### 1,000 (from 3 boxes)") == "1000"  # the number right after the last ####
    assert gsm8k_prediction("#### about 5, maybe 6") == "6"  # no number right after it: the last one


@pytest.mark.parametrize(("prediction", "reference", "match"), [
    ("The answer is $\\boxed{0.5}$", "\\frac{1}{2}", True),  # AGIEval math: worked answers, LaTeX references
    ("The answer is 2.", "2", True),
    ("so $x = 3$", "3", True),
    ("\\frac{3}{4}", "$\\frac{3}{4}$", True),
    ("(1,2)", "(1, 2)", True),
    ("红色", "红色", True),  # not mathematics: equal as text
    ("so 11", "12", False),
    ("北京", "上海", False),
])
def test_math_match_compares_answers_as_mathematics(prediction: str, reference: str, match: bool) -> None:
    """A user's try (2026-12-04): AGIEval's cloze answers were compared as exact text, `The answer is 2.` wrong."""
    assert math_match(prediction, reference) is match
