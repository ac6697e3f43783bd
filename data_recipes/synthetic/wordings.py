"""Training wordings of the built-in model's recipe: many phrasings of every question and report.

A pretrained LLM tuned on one or two sentences per question learns the sentence; tuned on many, it
learns what is asked. These lists are what `default_model` trains on. The reworded questions it is
scored on live in `reworded.py`, which no training code imports (a test checks that none of them
occurs in the training conversations).
"""

from __future__ import annotations

from data_recipes.synthetic.layout import CLASS_NAMES, QUADRANTS
from data_recipes.synthetic.questions import QUESTION_TYPES, join_names
from data_recipes.synthetic.truth import SlideTruth

__all__ = ["QUADRANT_WORDINGS", "REPORT_TEMPLATES", "TRAIN_WORDINGS", "NUMBER_WORDS", "location_answer",
           "quadrant_answer", "training_report"]

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")

#: Per question type: the dataset's own wordings first (the held-out closed questions use them),
#: then more phrasings. "{cls}" is the class asked about.
TRAIN_WORDINGS: dict[str, tuple[str, ...]] = {
    "presence": QUESTION_TYPES["presence"].wordings + (
        "Which tissue type appears on this slide?",
        "Which one of these tissues is on the slide?",
        "Which of the listed tissue types does the slide contain?",
        "One of these tissue types is on the slide. Which one?",
        "Which tissue among the options is found in this slide?",
        "What tissue from this list is present in the section?",
        "Which of these can you find on the slide?",
    ),
    "dominant": QUESTION_TYPES["dominant"].wordings + (
        "Which tissue type is most abundant on the slide?",
        "What is the main tissue type of this slide?",
        "Which tissue takes up the most area?",
        "Which tissue type makes up most of the tissue?",
        "What tissue predominates here?",
        "Which tissue type occupies the largest part of the section?",
        "Of these tissue types, which one covers the most tissue?",
    ),
    "location": QUESTION_TYPES["location"].wordings + (
        "Where is the {cls} on the slide?",
        "Which quadrant holds the {cls}?",
        "In which quadrant of the slide is the {cls} region?",
        "Where can the {cls} be found on the slide?",
        "Which part of the slide contains the {cls}?",
        "Locate the region of {cls} on the slide.",
        "Where does the {cls} lie on the glass?",
    ),
    "region_count": QUESTION_TYPES["region_count"].wordings + (
        "How many tissue regions does the slide show?",
        "How many pieces of tissue are on the slide?",
        "Count the separate tissue regions on this slide.",
        "How many distinct regions of tissue are there?",
        "How many separate tissue fragments can be seen?",
        "What is the number of separate tissue pieces on the slide?",
        "How many tissue pieces does this section have?",
    ),
    "tissue_amount": QUESTION_TYPES["tissue_amount"].wordings + (
        "How much tissue does this slide contain?",
        "What amount of tissue is on the slide?",
        "Is there little or a lot of tissue on the slide?",
        "How large is the amount of tissue on this slide?",
        "Rate the amount of tissue on the slide.",
        "How much of the slide is covered by tissue?",
        "What is the quantity of tissue on this slide?",
    ),
    "presence_open": QUESTION_TYPES["presence_open"].wordings + (
        "Which tissue types can you see?",
        "List the tissue types on this slide.",
        "What tissue types does the slide contain?",
        "Name the tissue types present on the slide.",
        "What kinds of tissue are on this slide?",
    ),
    "dominant_open": QUESTION_TYPES["dominant_open"].wordings + (
        "Which tissue type covers the largest area?",
        "What is the main tissue on the slide?",
        "Which tissue dominates the slide?",
        "What tissue makes up most of the section?",
    ),
    "location_open": QUESTION_TYPES["location_open"].wordings + (
        "Where is the {cls} on the slide?",
        "Which quadrant holds the {cls}?",
        "Where on the slide is the {cls} found?",
        "Which part of the slide shows the {cls}?",
    ),
    "region_count_open": QUESTION_TYPES["region_count_open"].wordings + (
        "How many tissue regions does the slide show?",
        "How many pieces of tissue are on the slide?",
        "Count the separate tissue regions on this slide.",
        "How many tissue fragments are there?",
    ),
    "tissue_amount_open": QUESTION_TYPES["tissue_amount_open"].wordings + (
        "How much tissue does this slide contain?",
        "What amount of tissue is on the slide?",
        "Is the amount of tissue small, medium or large?",
        "How much tissue is there on the glass?",
    ),
    "report": QUESTION_TYPES["report"].wordings + (
        "Describe what you see on this slide.",
        "Give me a short report of the slide.",
        "What does this slide show?",
        "Can you describe the slide?",
        "Write a brief description of this slide.",
        "Please summarize the slide.",
        "Report on this slide.",
        "Tell me about this slide.",
    ),
}


# Training only (never scored): what lies in a named quadrant. The reverse of a location question; it
# makes the model read one slide token by its name.
QUADRANT_WORDINGS: tuple[str, ...] = (
    "What is in the {quadrant} of the slide?",
    "Which tissue lies in the {quadrant} quadrant?",
    "What does the {quadrant} part of the slide show?",
    "Name the tissue in the {quadrant} quadrant.",
    "What tissue type is found in the {quadrant}?",
)


def quadrant_answer(truth: SlideTruth, quadrant: str) -> str:
    """The classes of the regions in `quadrant` ("no tissue" when it is empty)."""
    names = sorted({CLASS_NAMES[r.tissue_class] for r in truth.regions if r.quadrant == quadrant})
    return join_names(names) if names else "no tissue"


def _regions(truth: SlideTruth, quadrant_order: bool = False) -> str:
    regions = sorted(truth.regions, key=lambda r: QUADRANTS.index(r.quadrant)) if quadrant_order else truth.regions
    return join_names([f"{CLASS_NAMES[r.tissue_class]} in the {r.quadrant}" for r in regions])


def location_answer(truth: SlideTruth, quadrant: str) -> str:
    """A location answer that lists the regions first, then names the one asked about (in `quadrant`).

    Tuned SmolLM2 lists a slide's regions from its slide tokens (the reports of a model tuned with direct
    location answers placed 87% of the classes right on slides with several regions), but asked where
    one class lies, that model picked a quadrant by the slide, not by the class. With the regions listed
    first (in reading order, the order of the slide tokens), the answer is a copy of the list's own words:
    "Two separate regions: tumor in the upper left and stroma in the lower right. Answer: stroma in the
    lower right."
    """
    asked = [r.tissue_class for r in truth.regions if r.quadrant == quadrant]
    if len(asked) != 1 or truth.unique_location(asked[0]) != quadrant:
        raise ValueError(f"{truth.slide_id}: the {quadrant} holds no class found only there")
    n = truth.region_count
    regions = _regions(truth, quadrant_order=True)
    return (f"{NUMBER_WORDS[n].capitalize()} separate region{'s' if n > 1 else ''}: {regions}. "
            f"Answer: {CLASS_NAMES[asked[0]]} in the {quadrant}.")


#: Report phrasings. Every one states the region count beside the list of regions (so a count that
#: disagrees with the list is visible to the scorer), the tissue types present, the dominant type and
#: the amount, each once; the count is always a number word followed by region(s) or piece(s).
REPORT_TEMPLATES: tuple[str, ...] = (
    "{Count} separate tissue {region_word}: {regions}. The dominant tissue type is {dominant}. "
    "The amount of tissue is {amount}.",
    "The slide shows a {amount} amount of tissue in {count} separate {piece_word}: {regions}. "
    "Tissue types present: {present}; mostly {dominant}.",
    "Tissue types present: {present}. Largest area: {dominant}. {Count} {region_word}: {regions}. "
    "Amount of tissue: {amount}.",
    "There is a {amount} amount of tissue, in {count} {region_word}: {regions}. It contains {present}, "
    "and {dominant} covers the largest area.",
    "This slide holds {count} separate {piece_word} of tissue ({regions}). The tissue types are {present}. "
    "The dominant type is {dominant}, and the amount of tissue is {amount}.",
    "Amount of tissue: {amount}. {Count} separate {region_word}: {regions}. Present: {present}. "
    "Dominant: {dominant}.",
)


def training_report(truth: SlideTruth, variant: int) -> str:
    """The report of `truth` in phrasing `variant` (any int; taken modulo the number of templates)."""
    n = truth.region_count
    count = NUMBER_WORDS[n]
    s = "s" if n > 1 else ""
    return REPORT_TEMPLATES[variant % len(REPORT_TEMPLATES)].format(
        Count=count.capitalize(), count=count, region_word=f"region{s}", piece_word=f"piece{s}",
        regions=_regions(truth), present=join_names([CLASS_NAMES[c] for c in truth.present]),
        dominant=CLASS_NAMES[truth.dominant], amount=truth.amount)
