"""Inference: one pipeline from a slide (or its cached features) to streamed answers and evidence.

Chat (`pathchat chat`), batch reports (`pathchat report`), the web UI, the demo and evaluation all
go through `Pipeline`; the decode loop lives in `engine`.
"""

from pathchat.inference.notices import NO_SLIDE_ANSWER, NO_TISSUE_ANSWER, RESEARCH_NOTICE
from pathchat.inference.recipe import FeatureRecipe, FeatureRecipeError, SlideResolutionError

__all__ = ["NO_SLIDE_ANSWER", "NO_TISSUE_ANSWER", "RESEARCH_NOTICE", "FeatureRecipe", "FeatureRecipeError",
           "Pipeline", "SlideResolutionError"]


def __getattr__(name: str):  # the pipeline imports torch and transformers: only when asked for
    if name == "Pipeline":
        from pathchat.inference.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
