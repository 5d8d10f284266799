"""The clarifier's rules, as its docstring states them."""

from __future__ import annotations

import pytest

from nimu_rt import clarifier


def ids(prompt: str) -> list[str]:
    return [q.id for q in clarifier.questions_for(prompt, min_words=5)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", ["detail", "setting", "style"]),
        ("A red fox trots through a snowy forest at dawn, cinematic", []),
        ("A red fox trots and leaps high, tracking shot", ["setting"]),
        ("A red fox trots through a snowy forest at dawn", ["style"]),
        ("cinematic sunset at the beach, wide aerial shot", ["subject"]),
        ("An old man feeds pigeons in the park, slow motion", []),
    ],
)
def test_rules(prompt, expected):
    assert ids(prompt) == expected


def test_merge_adds_labelled_sentences_in_question_order():
    questions = clarifier.questions_for("a cat", min_words=5)
    merged = clarifier.merge(
        "a cat.",
        questions,
        {"style": "anime", "setting": "a rooftop at dusk", "detail": "It sleeps"},
    )
    assert merged == (
        "a cat. Scene: It sleeps. Setting: a rooftop at dusk. Style: anime."
    )
