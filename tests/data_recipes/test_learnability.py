"""The model reads the slide: held-out closed questions vs the shuffled- and zeroed-features controls.

The `demo_model` fixture runs the whole synthetic recipe once per session (dataset, stage 1,
stage 2, evaluation); `make learnability` runs the same recipe from scratch and prints its JSON.
"""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the session's first use of demo_model trains it (about 8 minutes)
def test_heldout_accuracy_and_negative_controls(demo_model):
    _, ckpt, s = demo_model
    print({k: s[k] for k in ("heldout_accuracy", "shuffled_features_accuracy", "zeroed_features_accuracy",
                             "chance", "per_type")})
    assert s["heldout_closed_questions"] == 308
    # The target: >= 90% of the held-out closed questions (measured 0.971 with seed 0 on 2
    # threads, against 0.227 / 0.266 under the controls, chance 0.266), far above both controls.
    assert s["heldout_accuracy"] >= 0.90
    assert s["heldout_accuracy"] - max(s["shuffled_features_accuracy"], s["zeroed_features_accuracy"]) >= 0.6
    # without the right slide (another slide's, or a blank one) the model falls back to chance
    assert abs(s["shuffled_features_accuracy"] - s["chance"]) <= 0.10
    assert abs(s["zeroed_features_accuracy"] - s["chance"]) <= 0.10
    per_type = s["per_type"]
    assert set(per_type["heldout"]) == {"presence", "dominant", "location", "region_count", "tissue_amount"}
    # every type is read from the slide; location (which of several regions is where) is the hardest
    floors = {"dominant": 0.9, "region_count": 0.9, "tissue_amount": 0.9, "presence": 0.85, "location": 0.7}
    for qtype, floor in floors.items():
        assert per_type["heldout"][qtype] >= floor, (qtype, per_type["heldout"][qtype])
        assert per_type["heldout"][qtype] - per_type["shuffled_features"][qtype] >= 0.4, qtype
    # both stages ran
    assert s["train"]["align_steps"] > 0 and s["train"]["instruct_steps"] > 0
    assert (ckpt / "model.safetensors").is_file()
