"""Fixed texts every user-facing path shows; one place, so chat, reports and the UI say the same."""

RESEARCH_NOTICE = "For Research Use Only. Not for use in diagnostic procedures."
NO_SLIDE_ANSWER = ("No slide is open. Open a slide first; I answer questions about the slide that is "
                   "open, and about nothing else.")
NO_TISSUE_ANSWER = ("No tissue found: tissue detection kept no tiles on this slide, so there is nothing "
                    "to describe. Check the slide (blank, out of focus, or not brightfield) or the tissue "
                    "settings.")
INSUFFICIENT_TISSUE_ANSWER = NO_TISSUE_ANSWER
NO_TILES_IN_REGION_ANSWER = ("No tissue tiles lie inside this region (a tile counts when its centre is inside). "
                             "Draw a larger region over tissue.")
#: The fixed answer about a slide that cannot give the model's resolution; `{reason}` is
#: `SlideResolutionError.reason` (both resolutions, or "no mpp recorded").
INSUFFICIENT_RESOLUTION_ANSWER = ("Resolution too low for this model: {reason}. So this slide is not assessed and "
                                  "no model was asked. Use a finer scan of the slide (or one that records its "
                                  "resolution), or a model trained at a lower magnification.")
#: Every report section's answer for such a slide.
INSUFFICIENT_RESOLUTION_SECTION = "Resolution too low for this model: not assessed."
