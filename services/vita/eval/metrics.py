"""Answer normalisation and the metrics the benchmarks use: exact match, WER/CER (jiwer), option letters,
yes/no, the last number of a worked answer."""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

import jiwer

_PUNCTUATION = set(string.punctuation) | set("，。！？、；：“”‘’（）《》【】…—·")


def normalize(text: str) -> str:
    """Case, surrounding punctuation and spacing removed: `' Red.'` and `'red'` match; `'红色。'` and `'红色'`."""
    text = unicodedata.normalize("NFKC", text).strip().lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def math_match(prediction: str, reference: str) -> bool:
    """A free-form mathematical answer against the reference: equal as text (`normalize`), or as mathematics by
    Hugging Face's math-verify (what lighteval and open-r1 grade MATH with): the prediction's final answer
    (`\\boxed{}`, "the answer is ...", else its last expression) parsed and compared symbolically, so `0.5`,
    `\\frac{1}{2}` and `$\\boxed{1/2}$` all match `\\frac12`. math-verify bounds its work with SIGALRM, which only
    the main thread may use: elsewhere it runs without its time limit."""
    if exact_match(prediction, reference):
        return True
    import threading

    from math_verify import parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(reference if "$" in reference or "\\boxed" in reference else f"${reference}$",
                 parsing_timeout=limit)
    return bool(gold) and verify(gold, parse(prediction, parsing_timeout=limit), timeout_seconds=limit)


def asr_normalize(text: str) -> str:
    """For WER: lower case, punctuation dropped (apostrophes inside words kept), one space between words."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
    text = "".join(" " if ch in _PUNCTUATION and ch != "'" else ch for ch in text)
    return " ".join(text.split())


def chinese_chars(text: str) -> str:
    """For CER on Chinese: punctuation and spaces removed, Latin letters lower-cased."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not ch.isspace() and ch not in _PUNCTUATION)


def word_error_rate(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus WER (errors / reference words, over all utterances) plus its parts, after `asr_normalize`."""
    refs = [asr_normalize(r) for r in references]
    hyps = [asr_normalize(p) for p in predictions]
    return _rates(refs, hyps, chars=False)


def char_error_rate(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus CER for Chinese (each character is a token), after `chinese_chars`."""
    refs = [" ".join(chinese_chars(r)) for r in references]
    hyps = [" ".join(chinese_chars(p)) for p in predictions]
    return _rates(refs, hyps, chars=True)


def _rates(refs: list[str], hyps: list[str], *, chars: bool) -> dict[str, float]:
    keep = [k for k, r in enumerate(refs) if r]  # an empty reference has no words to get wrong
    if not keep:
        raise ValueError("every reference is empty after normalisation: nothing to score")
    out = jiwer.process_words([refs[k] for k in keep], [hyps[k] for k in keep])
    words = out.hits + out.substitutions + out.deletions
    errors = out.substitutions + out.deletions + out.insertions
    return {"cer" if chars else "wer": errors / words, "substitutions": out.substitutions,
            "deletions": out.deletions, "insertions": out.insertions, "reference_tokens": words}


CHOICE_LETTERS = "ABCDEFGHIJ"


def extract_choice(prediction: str, letters: str = "ABCD") -> str | None:
    """The option letter a free-form answer picks: `B`, `(B)`, `B.`, `Answer: B`, `答案是B`; else None. Lower case
    counts where it cannot be a word: the whole answer (`b`, `(b)`, `b.`) or after `Answer:`."""
    text = unicodedata.normalize("NFKC", prediction).strip()
    allowed = re.escape(letters)
    patterns = (  # (pattern, case-insensitive)
        (rf"^\(?([{allowed}])\)?[.。)]?$", True),
        (rf"^\(?([{allowed}])\)?(?:[.:：、)\s]|$)", False),
        (rf"(?:answer|答案)\s*(?:is|是|为|:|：)?\s*\(?([{allowed}])\)?(?![A-Za-z])", True),
        (rf"(?<![A-Za-z])\(?([{allowed}])\)?(?![A-Za-z])", False),
    )
    for pattern, any_case in patterns:
        m = re.search(pattern, text, flags=re.IGNORECASE if any_case else 0)
        if m:
            return m.group(1).upper()
    return None


def extract_yes_no(prediction: str) -> str | None:
    """MME's rule: the whole answer is yes/no, else 'yes'/'no' within its first four characters; else None."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    if text.startswith(("是", "对")):
        return "yes"
    if text.startswith(("不", "否")):
        return "no"
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in a worked answer, commas dropped and a trailing `.0` removed: `'1,234.0'` -> `'1234'`."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def accuracy(correct: Sequence[bool]) -> float:
    return sum(correct) / len(correct) if correct else 0.0
