"""Held-out wordings: the questions the built-in model is scored on but never trained on.

No training code imports this module (the recipe's evaluation does); `tests/data_recipes/
test_default_model.py` checks that none of these sentences occurs in the training conversations, so
a score on them measures whether the model understood the question, not whether it knew the sentence.
"""

from __future__ import annotations

__all__ = ["REWORDED_WORDINGS"]

#: Per question type, phrasings written apart from `wordings.TRAIN_WORDINGS`. "{cls}" is the class.
REWORDED_WORDINGS: dict[str, tuple[str, ...]] = {
    "presence": (
        "Looking at this section, which of the following tissues do you see?",
        "Can you tell me which of these tissue types shows up here?",
        "Spot the tissue that is on this glass. Which is it?",
    ),
    "dominant": (
        "What kind of tissue is there the most of?",
        "Looking at the whole section, which tissue is the biggest component?",
        "If you had to name the prevailing tissue, which would it be?",
    ),
    "location": (
        "Tell me the position of the {cls} on this glass.",
        "Looking at the section, where would I find the {cls}?",
        "Whereabouts on the slide is the {cls} located?",
    ),
    "region_count": (
        "Into how many separate parts is the tissue divided?",
        "How many individual bits of tissue were placed on this glass?",
        "Tell me the count of disconnected tissue areas.",
    ),
    "tissue_amount": (
        "Would you say there is a small, medium or large quantity of tissue here?",
        "Roughly how much material is on this glass?",
        "How big is the total tissue area?",
    ),
}
