"""The built-in model's recipe: its training records, the held-out wordings kept out of them, the
report scorer, and the general-chat prompts (no training here; the scores are in the recipe's JSON line)."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from data_recipes.synthetic.default_model import (
    CLOSED_EVIDENCE_TOKENS,
    DefaultModelConfig,
    check_reused_stage,
    near_amount_edge,
    parse_report,
    reworded_questions,
    score_reports,
    training_records,
    truth_from_dict,
)
from data_recipes.synthetic.general_chat import (
    DECLINE_PROMPTS,
    GENERAL_EVAL,
    REFUSAL,
    REHEARSAL_PROMPTS,
    passes,
    rehearsal_targets,
)
from data_recipes.synthetic.layout import AMOUNTS, CLASS_NAMES, QUADRANTS, RECIPE_CLASSES
from data_recipes.synthetic.reworded import REWORDED_WORDINGS
from data_recipes.synthetic.truth import RegionTruth, SlideTruth
from data_recipes.synthetic.wordings import (
    QUADRANT_WORDINGS,
    REPORT_TEMPLATES,
    TRAIN_WORDINGS,
    location_answer,
    training_report,
)

RECIPES = Path(__file__).resolve().parents[2] / "data_recipes" / "synthetic"


def _truths(n: int, seed: int = 0) -> list[SlideTruth]:
    """Random slide truths: 1-4 regions in distinct quadrants, a strict dominant class."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 5))
        quads = [QUADRANTS[q] for q in sorted(rng.permutation(4)[:k])]
        types = [str(c) for c in rng.choice(RECIPE_CLASSES, 3, replace=False)]  # as the layouts: <= 3 types
        classes = [str(rng.choice(types)) for _ in range(k)]
        sizes = [int(s) for s in rng.integers(3, 9, size=k)]
        sizes[0] += 20  # the first region's class dominates
        counts: dict[str, int] = {}
        for c, s in zip(classes, sizes, strict=True):
            counts[c] = counts.get(c, 0) + s
        out.append(SlideTruth(f"synth-train-{i:04d}", sum(sizes),
                              tuple(RegionTruth(c, q, s) for c, q, s in zip(classes, quads, sizes, strict=True)),
                              {c: counts[c] for c in RECIPE_CLASSES if c in counts}, classes[0],
                              str(rng.choice(AMOUNTS)), (), True))
    return out


def _texts(records: list[dict]) -> list[str]:
    return [turn["value"] for r in records for turn in r["conversations"]]


def test_reworded_wordings_never_occur_in_training_records():
    truths = _truths(60)
    cfg = DefaultModelConfig(instruct_rounds=2, align_rounds=2, rehearsal_per_round=4)
    records = training_records(truths, cfg, {p: "An answer." for p in REHEARSAL_PROMPTS})
    texts = "\n".join(_texts(records["align"]) + _texts(records["instruct"])).lower()
    names = sorted({c for t in truths for c in t.present})
    for category, wordings in REWORDED_WORDINGS.items():
        assert wordings, category
        for w in wordings:
            for cls in names if "{cls}" in w else [""]:
                sentence = w.format(cls=cls).lower()
                assert sentence not in texts, f"{category}: {sentence!r} is in the training data"
    # by construction too: no training wording is a held-out one, and training code never imports them
    assert not set(w for ws in REWORDED_WORDINGS.values() for w in ws) & set(w for ws in TRAIN_WORDINGS.values()
                                                                            for w in ws)
    for module in ("wordings.py", "build.py", "questions.py", "general_chat.py"):
        tree = ast.parse((RECIPES / module).read_text())
        imported = {getattr(n, "module", None) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "data_recipes.synthetic.reworded" not in imported, module
    # every closed type has held-out wordings, and the held-out rows use them
    assert set(REWORDED_WORDINGS) == {"presence", "dominant", "location", "region_count", "tissue_amount"}
    rows = reworded_questions(truths[:20], seed=0)
    held = {w.split("{cls}")[0] for ws in REWORDED_WORDINGS.values() for w in ws}
    assert rows and all(any(r["question"].startswith(h) for h in held) for r in rows)
    assert {r["category"] for r in rows} == set(REWORDED_WORDINGS)


def test_training_records_use_many_wordings_and_are_deterministic():
    truths = _truths(40)
    cfg = DefaultModelConfig(instruct_rounds=2, align_rounds=2, rehearsal_per_round=0)
    a = training_records(truths, cfg)
    assert a == training_records(truths, cfg)
    assert len(a["align"]) == 2 * len(truths)
    questions = {r["conversations"][0]["value"].split("\n")[1] for r in a["instruct"]}
    # at least 6 phrasings of the dominant-class question reach the training data
    assert len(questions & set(TRAIN_WORDINGS["dominant"])) >= 6
    reports = {r["conversations"][1]["value"] for r in a["align"]}
    assert len(reports) > len(truths)  # two phrasings of most slides' reports
    # a standalone report per slide a round (report_records=1), besides the report-then-question dialogue
    standalone = [r for r in a["instruct"] if r["id"].endswith("/r1rep0")]
    assert len(standalone) == len(truths) and all(len(r["conversations"]) == 2 for r in standalone)
    assert sum("/r1report" in r["id"] for r in a["instruct"]) == len(truths)


@pytest.mark.parametrize("variant", range(len(REPORT_TEMPLATES)))
def test_every_report_phrasing_parses_to_its_truth(variant):
    for truth in _truths(30, seed=variant):
        parsed = parse_report(training_report(truth, variant))
        assert parsed["classes"] == sorted(truth.present)
        assert parsed["count"] == truth.region_count
        assert parsed["amount"] == truth.amount
        assert len(parsed["regions"]) == truth.region_count
        assert parsed["contradictions"] == []


def test_report_scores_count_a_self_contradiction_as_wrong():
    truths = _truths(3)
    by_id = {t.slide_id: t for t in truths}
    good = {t.slide_id: training_report(t, 0) for t in truths}
    s = score_reports(good, by_id)
    assert (s["class_precision"], s["class_recall"], s["count_accuracy"], s["amount_accuracy"]) == (1, 1, 1, 1)
    t = truths[0]
    regions = " and ".join(f"{r.tissue_class} in the {r.quadrant}" for r in t.regions)
    wrong_count = t.region_count % 4 + 1
    bad = {t.slide_id: f"{['One', 'Two', 'Three', 'Four'][t.region_count - 1]} separate tissue regions: "
                       f"{regions}, tumor in the nowhere. {['One', 'Two', 'Three', 'Four'][wrong_count - 1]} "
                       f"regions. The amount of tissue is {t.amount}."}
    s = score_reports(bad, by_id)
    assert s["count_accuracy"] == 0.0 and s["contradiction_rate"] == 1.0


def test_truth_from_dict_round_trip():
    t = _truths(1)[0]
    back = truth_from_dict(json.loads(json.dumps(t.to_dict())))
    assert back.regions == t.regions and back.class_tiles == t.class_tiles and back.amount == t.amount


def test_general_prompts_are_twenty_with_keywords_and_apart_from_rehearsal():
    assert len(GENERAL_EVAL) == 20
    assert not {g.prompt for g in GENERAL_EVAL} & set(REHEARSAL_PROMPTS)
    g = GENERAL_EVAL[0]
    assert passes(g, "2 + 2 = 4.") and not passes(g, "The slide shows stroma.")
    decline = next(x for x in GENERAL_EVAL if "steal" in x.prompt)
    assert passes(decline, "I'm sorry, I can't help with that.") and not passes(decline, "First, find a car.")


def test_rehearsal_trains_refusals_for_harmful_prompts_and_base_answers_for_the_rest():
    base = {p: f"base answer {i}" for i, p in enumerate(REHEARSAL_PROMPTS)}
    targets = rehearsal_targets(base)
    assert len(DECLINE_PROMPTS) == 5 and set(REHEARSAL_PROMPTS) >= DECLINE_PROMPTS
    assert all(targets[p] == REFUSAL for p in DECLINE_PROMPTS)
    assert all(targets[p] == base[p] for p in REHEARSAL_PROMPTS if p not in DECLINE_PROMPTS)
    # the trained refusal is what the evaluation counts as declining
    for g in GENERAL_EVAL[-2:]:
        assert passes(g, REFUSAL), g.prompt



def test_slide_token_labels_name_the_quadrant_each_grid_token_reads():
    """A tile in the middle of layout quadrant q (x: q % 2, y: q // 2, as `layout` draws regions) falls in
    the connector's grid cell q, so label q names the quadrant the q-th slide token reads."""
    import torch

    from pathchat.model.connectors.positions import grid_cells

    cfg = DefaultModelConfig()
    assert cfg.connector["grid_size"] == 2 and cfg.connector["num_latents"] == 0
    assert cfg.connector["position_frame"] == "slide"
    size = torch.tensor([[8000.0, 6000.0]])
    centres = torch.tensor([[[(q % 2 + 0.5) * 4000.0, (q // 2 + 0.5) * 3000.0] for q in range(4)]])
    assert grid_cells(centres, size, 2).tolist() == [[0, 1, 2, 3]]
    assert cfg.slide_token_labels == [f" {q}:" for q in QUADRANTS]


def _closed_answers_in(truths: list[SlideTruth], cfg: DefaultModelConfig, answers: tuple[str, ...]) -> dict[str, int]:
    """Per slide, the closed questions of stage 2 answered by one of `answers` (open questions are drawn at
    random, and the report dialogue's follow-up is left out)."""
    counts = dict.fromkeys((t.slide_id for t in truths), 0)
    for r in training_records(truths, cfg)["instruct"]:
        turns = r["conversations"]
        if "report" not in r["id"] and "\nA) " in turns[0]["value"]:
            counts[r["slide"]] += turns[1]["value"] in answers
    return counts


def test_location_repeats_ask_every_located_class_again_where_there_are_several_regions():
    truths = _truths(40)
    base = DefaultModelConfig(instruct_rounds=1, rehearsal_per_round=0, location_evidence=False)  # bare quadrants
    more = DefaultModelConfig(instruct_rounds=1, rehearsal_per_round=0, location_evidence=False, location_repeats=2)

    before, after = _closed_answers_in(truths, base, QUADRANTS), _closed_answers_in(truths, more, QUADRANTS)
    for t in truths:
        located = sum(t.unique_location(c) is not None for c in t.present)
        assert after[t.slide_id] - before[t.slide_id] == (2 * located if len(t.regions) > 1 else 0), t
    assert sum(after.values()) > 1.5 * sum(before.values())


def test_quadrant_questions_name_what_lies_in_the_quadrant():
    truths = _truths(40)
    cfg = DefaultModelConfig(instruct_rounds=2, rehearsal_per_round=0, quadrant_questions=1)
    by_id = {t.slide_id: t for t in truths}
    asked = 0
    for r in training_records(truths, cfg)["instruct"]:
        question, answer = r["conversations"][0]["value"].split("\n", 1)[-1], r["conversations"][1]["value"]
        for w in QUADRANT_WORDINGS:
            head, tail = w.split("{quadrant}")
            if question.startswith(head) and question.endswith(tail):
                quadrant = question[len(head): len(question) - len(tail)]
                regions = [x for x in by_id[r["slide"]].regions if x.quadrant == quadrant]
                assert answer == (CLASS_NAMES[regions[0].tissue_class] if regions else "no tissue"), (question, answer)
                asked += 1
    assert asked >= 2 * len(truths)  # one a round per slide (and some as the report dialogue's follow-up)


def test_location_answer_lists_the_regions_in_reading_order_then_names_the_one_asked():
    t = SlideTruth("s", 30, (RegionTruth("stroma", "lower right", 8), RegionTruth("tumor", "upper left", 12),
                             RegionTruth("tumor", "upper right", 10)), {"tumor": 22, "stroma": 8}, "tumor", "large",
                   (), True)
    assert location_answer(t, "lower right") == (
        "Three separate regions: tumor in the upper left, tumor in the upper right and stroma in the lower right. "
        "Answer: stroma in the lower right.")
    for quadrant in ("upper left", "lower left"):  # tumor lies in two quadrants; the lower left is empty
        with pytest.raises(ValueError, match=f"the {quadrant} holds no class found only there"):
            location_answer(t, quadrant)


def test_location_evidence_answers_every_location_question_with_the_regions_first():
    """With `location_evidence`, each location question (closed and open) is answered by the slide's
    regions and then the asked class's quadrant, and the closed parser reads that answer's option; no
    other question's answer changes. Every answer fits the scorer's generation cap."""
    from transformers import AutoTokenizer

    from pathchat.evaluation.answers import parse_closed_answer
    from pathchat.model.builtin import builtin_model_dir

    truths = _truths(40)
    by_id = {t.slide_id: t for t in truths}

    def records(evidence: bool) -> list[dict]:
        cfg = DefaultModelConfig(instruct_rounds=1, rehearsal_per_round=0, location_evidence=evidence)
        return training_records(truths, cfg)["instruct"]

    plain, evidence = records(False), records(True)
    assert [r["id"] for r in plain] == [r["id"] for r in evidence]
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    changed = closed = 0
    for a, b in zip(plain, evidence, strict=True):
        assert len(a["conversations"]) == len(b["conversations"])
        for qa, aa, qb, ab in zip(a["conversations"][::2], a["conversations"][1::2],
                                  b["conversations"][::2], b["conversations"][1::2], strict=True):
            assert qa == qb
            if aa["value"] not in QUADRANTS:
                assert ab == aa
                continue
            changed += 1
            t = by_id[a["slide"]]
            assert ab["value"] == location_answer(t, aa["value"])
            assert ab["value"].endswith(f" in the {aa['value']}.")
            assert len(tokenizer(ab["value"]).input_ids) < CLOSED_EVIDENCE_TOKENS
            lines = qa["value"].split("\n")
            if len(lines) > 2 and lines[2].startswith("A) "):
                options = [line[3:] for line in lines[2:] if line[:1] in "ABCD" and line[1:3] == ") "]
                parsed = parse_closed_answer(ab["value"], options)
                assert options[ord(parsed.letter) - ord("A")] == aa["value"], (qa, ab)
                closed += 1
    assert changed >= len([t for t in truths if len(t.regions) > 1]) and 0 < closed < changed  # open ones too


def test_amount_repeats_ask_the_amount_again_only_where_the_tile_count_is_near_a_bin_edge():
    truths = [dataclasses.replace(t, n_tiles=(4, 8, 14, 17, 25)[i % 5]) for i, t in enumerate(_truths(60))]
    assert sum(near_amount_edge(t) for t in truths) == 24
    assert [near_amount_edge(dataclasses.replace(truths[0], n_tiles=n)) for n in (6, 7, 12, 13, 15, 16, 21, 22)] == [
        False, True, True, False, False, True, True, False]  # 7-12 and 16-21 tiles: the edges after 9 and 18

    before = _closed_answers_in(truths, DefaultModelConfig(instruct_rounds=2, rehearsal_per_round=0), AMOUNTS)
    after = _closed_answers_in(truths, DefaultModelConfig(instruct_rounds=2, rehearsal_per_round=0, amount_repeats=3),
                               AMOUNTS)
    for t in truths:
        assert after[t.slide_id] - before[t.slide_id] == (6 if near_amount_edge(t) else 0), t


def test_a_finished_stage_with_another_connector_is_not_reused(tmp_path):
    """Stage 2 inherits stage 1's connector: a stage 1 left in --out by another config is an error."""
    cfg = DefaultModelConfig()
    check_reused_stage(tmp_path / "align", cfg)  # nothing there: trained
    (tmp_path / "align").mkdir()
    saved = {**cfg.connector, "max_wavelength_um": 32000.0}  # a saved config also lists the defaults
    (tmp_path / "align" / "config.json").write_text(json.dumps({"connector": saved}))
    check_reused_stage(tmp_path / "align", cfg)
    (tmp_path / "align" / "config.json").write_text(json.dumps({"connector": {**saved, "per_token_output": False}}))
    with pytest.raises(ValueError, match=r"align: a finished stage with another connector .*'per_token_output': \(False, True\)"):
        check_reused_stage(tmp_path / "align", cfg)
