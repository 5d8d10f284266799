"""The rule-based clarifier: what to ask before paying for a video.

A Veo 3 generation costs real money, so a prompt that leaves the important
choices open is worth one round of questions first. The rules are plain word
checks, applied to the prompt in this order:

``detail``
    The prompt has fewer than ``generations.min_prompt_words`` words. Asks
    for a sentence or two on who or what is in the scene and what happens.
``subject``
    The prompt names no subject: every word is a stop word, a setting word
    or a style word (e.g. "cinematic sunset at the beach"). Asks who or what
    the video is about.
``setting``
    No place or time of day is named (no word such as "beach", "kitchen",
    "night", nor a phrase "in the ...", "at the ...", "on the ..."). Asks
    where and when the scene takes place.
``style``
    No visual style or camera word (such as "cinematic", "animated",
    "close-up", "drone", "handheld", "35mm"). Asks for the look and the
    camera work.

Question ids are stable: clients may key translations or UI on them.

Answers are merged into ``finalPrompt`` as labelled sentences after the
prompt, in the order of the questions, e.g. ``"A cat. Setting: a rooftop at
dusk. Style: handheld, shallow focus."`` What it does not do: understand
language. A prompt can satisfy the word checks and still be vague, and no
question is asked about audio, which Veo 3 always generates.
"""

from __future__ import annotations

import re

from nimu_rt.models import Question

QUESTIONS: dict[str, Question] = {
    q.id: q
    for q in (
        Question(
            id="detail",
            text="Describe the scene in a sentence or two: who or what is in it,"
            " and what happens?",
            hint="A golden retriever chases a red ball across a wet lawn.",
        ),
        Question(
            id="subject",
            text="Who or what is the video about?",
            hint="An old fisherman mending a net.",
        ),
        Question(
            id="setting",
            text="Where does the scene take place, and at what time of day?",
            hint="A foggy harbour at dawn.",
        ),
        Question(
            id="style",
            text="What visual style and camera work do you want?",
            hint="Cinematic, slow dolly-in, shallow depth of field.",
        ),
    )
}
# Labels used when answers are merged into the final prompt.
LABELS = {
    "detail": "Scene",
    "subject": "Subject",
    "setting": "Setting",
    "style": "Style",
}

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")

STOP_WORDS = frozenset(
    """a an the and or but of to in on at by for with from into onto over under
    near is are was were be being been it its this that these those some any
    very so as than then there here video clip scene shot make create show
    me my i we our you your please of""".split()
)

SETTING_WORDS = frozenset(
    """beach sea ocean lake river harbour harbor port coast shore island forest
    wood woods jungle desert mountain mountains hill hills valley field fields
    meadow garden park farm city town village street streets road alley
    highway bridge rooftop roof market cafe restaurant bar kitchen bedroom
    room house home office classroom school library studio stage arena
    stadium warehouse factory lab laboratory hospital church temple castle
    palace station airport train subway space planet moon mars sky clouds
    underwater cave snow rain storm fog night dawn dusk sunset sunrise morning
    evening afternoon noon midnight daytime nighttime indoors outdoors
    interior exterior spring summer autumn fall winter""".split()
)

STYLE_WORDS = frozenset(
    """cinematic cinema film filmic movie realistic photorealistic
    hyperrealistic documentary animated animation anime cartoon pixar 3d 2d
    cgi claymation stop-motion watercolor watercolour painterly oil sketch
    noir vintage retro vhs 8mm 16mm 35mm 70mm imax close-up closeup macro
    wide wide-angle aerial drone overhead tracking dolly pan tilt zoom
    handheld steadicam slow-motion timelapse time-lapse pov first-person
    shallow bokeh lighting lit neon golden-hour moody dramatic minimalist
    surreal dreamy epic gritty glossy black-and-white monochrome vibrant
    pastel style styled lens camera shot angle""".split()
)

_PLACE_PHRASE = re.compile(r"\b(?:in|at|on|inside|outside|under|above) (?:a|an|the)\b")


def words(text: str) -> list[str]:
    """The lowercase words of ``text``, as the rules see them."""
    return _WORD.findall(text.lower())


def questions_for(prompt: str, *, min_words: int) -> list[Question]:
    """The questions to ask about ``prompt``; empty when it needs none."""
    found = words(prompt)
    wanted: list[str] = []
    if len(found) < min_words:
        wanted.append("detail")
    described = set(found) - STOP_WORDS - SETTING_WORDS - STYLE_WORDS
    # "slow motion" arrives as two words; count compound style words whole.
    joined = "-".join(found)
    has_style = bool(set(found) & STYLE_WORDS) or any(
        w in joined for w in STYLE_WORDS if "-" in w
    )
    if not described and "detail" not in wanted:
        wanted.append("subject")
    if not set(found) & SETTING_WORDS and not _PLACE_PHRASE.search(prompt.lower()):
        wanted.append("setting")
    if not has_style:
        wanted.append("style")
    return [QUESTIONS[q] for q in wanted]


def merge(prompt: str, questions: list[Question], answers: dict[str, str]) -> str:
    """The final prompt: the original plus each answer as a labelled sentence."""
    parts = [prompt.strip().rstrip(".") + "."]
    for question in questions:
        answer = answers.get(question.id, "").strip()
        if answer:
            parts.append(f"{LABELS[question.id]}: {answer.rstrip('.')}.")
    return " ".join(parts)
