"""Build the synthetic learnability dataset: slides -> tiles -> features -> reports and questions.

Layout of `OUT`:
    slides/<id>.tiff              the synthetic slides (generic TIFF, 1 µm/px)
    job/                          the `pathchat extract` job (coords, QC images, manifest, features)
    features -> job/<tiling>/features_<encoder>   the features folder (a relative symlink)
    align.jsonl                   stage 1: one report per training slide
    instruct.jsonl                stage 2: one record per question, plus one short dialogue per slide
    heldout.jsonl                 the same records for the held-out slides
    heldout_align.jsonl           reports of the held-out slides
    heldout_questions.jsonl       evaluation questions of the held-out slides (CONTRACTS.md schema)
    dataset.json                  counts, seed, encoder, question types, chance levels, probe accuracy

Everything is deterministic in the seed: the same seed gives byte-identical JSONL files and
identical feature values. Tiles and features come from the library's own `extract_slides` (the
`pathchat extract` verb), so the dataset exercises the real pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_recipes.synthetic.layout import RECIPE_CLASSES, Geometry, SlideLayout, sample_layout
from data_recipes.synthetic.questions import (
    QUESTION_TYPES,
    REPORT_VARIANTS,
    LetterBalancer,
    QAItem,
    chance_level,
    conversation,
    slide_questions,
    slide_report,
)
from data_recipes.synthetic.slides import write_slides
from data_recipes.synthetic.truth import SlideTruth, TruthMismatchError, slide_truth
from pathchat.utils.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "heldout")


@dataclass(frozen=True)
class BuildConfig:
    """What decides the dataset's content. Changing any field gives another dataset."""

    train: int = 300  # training slides
    heldout: int = 60  # held-out slides (evaluation)
    seed: int = 0
    encoder: str = "random-cnn-tiny"  # registry encoder that needs no download
    texture_variants: int = 4  # texture seeds shared by all slides (same tissue, different cells)
    geometry: Geometry = field(default_factory=Geometry)

    def __post_init__(self) -> None:
        if self.train < 1 or self.heldout < 1:
            raise ValueError(f"need at least one training and one held-out slide, got {self.train}/{self.heldout}")
        if self.texture_variants < 1:
            raise ValueError(f"texture_variants must be >= 1, got {self.texture_variants}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["geometry"] = self.geometry.to_dict()
        return d


@dataclass
class BuildResult:
    out: Path
    summary: dict[str, Any]  # the content of dataset.json


def slide_id(split: str, index: int) -> str:
    return f"synth-{split}-{index:04d}"


def slide_index(sid: str) -> int:
    """The index `slide_id` was made from: it seeds the slide, so slide i is the same in every build."""
    return int(sid.rsplit("-", 1)[1])


def draw_layouts(cfg: BuildConfig) -> dict[str, list[SlideLayout]]:
    """Every slide's layout, from `np.random.default_rng([seed, split, index])`: independent of order."""
    textures = tuple(cfg.seed * 64 + j for j in range(cfg.texture_variants))
    sizes = {"train": cfg.train, "heldout": cfg.heldout}
    return {
        split: [sample_layout(slide_id(split, i), np.random.default_rng([cfg.seed, s, i]), cfg.geometry, textures)
                for i in range(sizes[split])]
        for s, split in enumerate(SPLITS)
    }


def _tiling_config(cfg: BuildConfig) -> Any:
    from pathchat.wsi.grid import TilingParams
    from pathchat.wsi.tile_job import TileJobConfig
    from pathchat.wsi.tissue import TissueParams

    g = cfg.geometry
    # The mask is computed on the 4x-downsampled level (4 µm/px: 32 mask pixels per tile side, a few
    # percent of tile share at worst, inside the layouts' uncertain band), not on the full slide.
    return TileJobConfig(tiling=TilingParams(mpp=g.mpp, tile_px=g.tile_px, min_tissue=g.min_tissue),
                         tissue=TissueParams(thumbnail_max_side=g.slide_px // 4))


def extract_features(cfg: BuildConfig, slide_paths: list[Path], job: Path, workers: int,
                     progress: bool) -> Path:
    """Tile and encode every slide with the library's extraction job; returns its features folder.

    Raises:
        RuntimeError: a slide failed (the job's failures.jsonl has the details).
    """
    from pathchat.features.extract import ExtractJobConfig, RuntimeOptions, extract_slides
    from pathchat.features.store import encoder_dir_name

    tile_cfg = _tiling_config(cfg)
    config = ExtractJobConfig(encoder=cfg.encoder, tile=tile_cfg)
    # Tens of tiles per slide: decoding in the extraction process beats starting loader processes.
    runtime = RuntimeOptions(batch_size=64, loader_workers=0, device="cpu")
    summary = extract_slides(slide_paths, job, config, runtime, workers=workers, progress=progress)
    if summary.failed:
        first = summary.failures[0]
        raise RuntimeError(f"{summary.failed} slides failed in {job} (see failures.jsonl); first: "
                           f"{first['slide_id']}: {first['message']}")
    return job / tile_cfg.tiling.folder_name / f"features_{encoder_dir_name(cfg.encoder)}"


def _link_features(out: Path, features_dir: Path) -> Path:
    link = out / "features"
    target = os.path.relpath(features_dir, out)
    if link.is_symlink() and os.readlink(link) == target:
        return link
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link}: a folder is in the way of the features link; remove it")
    link.symlink_to(target, target_is_directory=True)
    return link


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


#: Extra rounds of the hard question types on each training slide where they are hard (`hard_types`).
HARD_REPEATS = 3


def hard_types(truth: SlideTruth) -> tuple[str, ...]:
    """The closed types that need the model to bind a word to one part of a slide with several.

    On a one-class slide, "which type is present" and "which dominates" are the same question, and
    on a one-region slide the region's quadrant is the tissue's; answering "the class I see" is
    right there. On the other slides it is wrong (a present class that is not among the options;
    the quadrant of another region), so those are the questions the model must see often.
    Measured, one run each: presence and location once more on every slide, 0.828 held-out; three
    more times on only these slides, 0.890 (presence 0.78 -> 0.89, location 0.65 -> 0.71, but
    dominant 0.97 -> 0.87, so dominant joined them: 0.873, dominant 0.93, inside the spread of
    runs). The 0.890 model did not even fit its training slides (presence 0.86, location 0.71
    there); shorter packs fixed that (`LearnConfig.pack_max_records`).
    """
    many_classes = len(truth.present) > 1
    return tuple(c for c, hard in (("presence", many_classes), ("dominant", many_classes),
                                   ("location", len(truth.regions) > 1)) if hard)


def build_records(truths: dict[str, list[SlideTruth]], seed: int) -> dict[str, list[dict[str, Any]]]:
    """All JSONL rows, keyed by file stem. Deterministic in `seed` and the truths."""
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in
                                              ("align", "instruct", "heldout", "heldout_align", "heldout_questions")}
    for s, split in enumerate(SPLITS):
        balancer = LetterBalancer(np.random.default_rng([seed, s, 1_000_003]))
        for truth in truths[split]:
            # seeded by the slide's own index (its id's suffix), not by its position among kept slides
            rng = np.random.default_rng([seed, s, slide_index(truth.slide_id), 7])
            variant = int(rng.integers(REPORT_VARIANTS))
            report = QAItem("report", QUESTION_TYPES["report"].wordings[variant], None, None,
                            slide_report(truth, variant))
            meta = {"split": split, "truth": truth.to_dict()}
            align = conversation(truth.slide_id, f"{truth.slide_id}/align",
                                 [(report.user_text(), report.assistant_text())], {**meta, "report_variant": variant})
            # Training slides are asked about every present and located class and every open type:
            # with isolated packing each extra question is one more answer on the same slide encoding.
            if split == "train":
                items = slide_questions(truth, rng, balancer, max_per_type=3, open_questions=None)
                for _ in range(HARD_REPEATS):
                    items += slide_questions(truth, rng, balancer, max_per_type=3, only=hard_types(truth))
            else:
                items = slide_questions(truth, rng, balancer, open_questions=None)
            # One record per question (they are independent) ...
            convs = [conversation(truth.slide_id, f"{truth.slide_id}/q{j:02d}", [(it.user_text(), it.assistant_text())],
                                  {**meta, "categories": [it.category]}) for j, it in enumerate(items)]
            # ... and one short dialogue (report, then two questions) that teaches follow-up turns.
            follow = [report, *[it for it in items if it.options is None][:1], *[it for it in items if it.options][:1]]
            convs.append(conversation(truth.slide_id, f"{truth.slide_id}/dialogue",
                                      [(it.user_text(), it.assistant_text()) for it in follow],
                                      {**meta, "categories": [it.category for it in follow], "dialogue": True}))
            if split == "train":
                rows["align"].append(align)
                rows["instruct"] += convs
            else:
                rows["heldout_align"].append(align)
                rows["heldout"] += convs
                canonical = QAItem("report", QUESTION_TYPES["report"].wordings[0], None, None, slide_report(truth, 0))
                for j, it in enumerate([*items, canonical]):
                    rows["heldout_questions"].append(it.eval_record(f"{truth.slide_id}/q{j:02d}", truth.slide_id))
    return rows


def question_stats(questions: list[dict[str, Any]]) -> dict[str, Any]:
    """Per category: kind, group, count, chance, answer-letter counts and the majority-answer baseline."""
    stats: dict[str, Any] = {}
    for cat, qt in QUESTION_TYPES.items():
        rows = [q for q in questions if q["category"] == cat]
        entry: dict[str, Any] = {"kind": qt.kind, "group": qt.group, "num_options": qt.num_options,
                                 "chance": chance_level(cat), "heldout_count": len(rows)}
        if qt.kind == "closed" and rows:
            letters: dict[str, int] = {}
            texts: dict[str, int] = {}
            for q in rows:
                letters[q["answer"]] = letters.get(q["answer"], 0) + 1
                text = q["options"][ord(q["answer"]) - ord("A")]
                texts[text] = texts.get(text, 0) + 1
            entry["answer_letters"] = dict(sorted(letters.items()))
            entry["majority_answer_baseline"] = round(max(texts.values()) / len(rows), 4)
        stats[cat] = entry
    return stats


def build_dataset(out: str | os.PathLike[str], cfg: BuildConfig | None = None, workers: int = 2,
                  progress: bool = True, probe: bool = True) -> BuildResult:
    """Build (or finish building) the synthetic dataset in `out`; see the module docstring for the files.

    Args:
        out: output folder. A rerun with the same config reuses finished slides and features.
        cfg: sizes, seed, encoder, geometry.
        workers: processes for writing slides and for extraction.
        probe: also fit a linear probe (tile class from features) and record its held-out accuracy.
    Returns:
        The output folder and the summary written to `dataset.json`.
    Raises:
        FileExistsError: `out` holds a dataset built with another config.
        RuntimeError: extraction failed for a slide, or too many slides contradict their layout.
    """
    cfg = cfg or BuildConfig()
    out = Path(out)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "build_config.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != cfg.to_dict():
        raise FileExistsError(f"{out}: holds a dataset built with another config ({stamp}); use another --out")
    atomic_write_json(stamp, cfg.to_dict())

    timings: dict[str, float] = {}
    t = time.perf_counter()
    layouts = draw_layouts(cfg)
    timings["layouts_s"] = time.perf_counter() - t

    t = time.perf_counter()
    slide_dir = out / "slides"
    slide_dir.mkdir(exist_ok=True)
    jobs = [(slide_dir / f"{lay.slide_id}.tiff", lay.spec(cfg.geometry)) for split in SPLITS for lay in layouts[split]]
    written = write_slides(jobs, workers=workers, progress=progress)
    timings["write_slides_s"] = time.perf_counter() - t

    t = time.perf_counter()
    features_dir = extract_features(cfg, [p for p, _ in jobs], out / "job", workers, progress)
    link = _link_features(out, features_dir)
    timings["tile_and_extract_s"] = time.perf_counter() - t

    from pathchat.features.store import read_features_h5

    t = time.perf_counter()
    truths: dict[str, list[SlideTruth]] = {s: [] for s in SPLITS}
    rejected: list[dict[str, str]] = []
    n_tiles: list[int] = []
    feature_dim = 0
    agree = 0
    for split in SPLITS:
        for lay in layouts[split]:
            bag = read_features_h5(link / f"{lay.slide_id}.h5")
            feature_dim = bag.dim
            if bag.coords is None:
                raise RuntimeError(f"{link / lay.slide_id}.h5: no coords")
            try:
                truth = slide_truth(lay, cfg.geometry, bag.coords)
            except TruthMismatchError as e:
                rejected.append({"slide": lay.slide_id, "reason": str(e)})
                log.warning("left out: %s", e)
                continue
            truths[split].append(truth)
            n_tiles.append(truth.n_tiles)
            agree += truth.predicted_tiles_agree
    total = cfg.train + cfg.heldout
    if len(rejected) > max(1, total // 20):
        raise RuntimeError(f"{len(rejected)} of {total} slides contradict their layout; first: {rejected[0]}")

    rows = build_records(truths, cfg.seed)
    for name, records in rows.items():
        atomic_write_text(out / f"{name}.jsonl", _jsonl(records))
    timings["questions_s"] = time.perf_counter() - t

    stats = question_stats(rows["heldout_questions"])
    closed = [q for q in rows["heldout_questions"] if q["kind"] == "closed"]
    summary: dict[str, Any] = {
        "name": "pathchat-synthetic",
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "encoder": cfg.encoder,
        "feature_dim": feature_dim,
        "features_dir": "features",
        "features_dir_target": os.readlink(link),
        "classes": list(RECIPE_CLASSES),
        "files": {name: f"{name}.jsonl" for name in rows},
        "counts": {
            "train_slides": len(truths["train"]), "heldout_slides": len(truths["heldout"]),
            "rejected_slides": len(rejected), "slides_written_now": written,
            **{f"{name}_records": len(records) for name, records in rows.items()},
            "instruct_turns": sum(len(r["conversations"]) // 2 for r in rows["instruct"]),
            "tiles_per_slide": {"mean": round(float(np.mean(n_tiles)), 2), "min": int(min(n_tiles)),
                                "max": int(max(n_tiles))},
            "slides_with_predicted_tiles": agree,
        },
        "question_types": stats,
        # a uniform guess over all closed held-out questions (the shuffled/zeroed-features reference)
        "chance": round(float(np.mean([1 / len(q["options"]) for q in closed])), 4),
        "rejected": rejected,
    }
    if probe:
        from data_recipes.synthetic.probe import probe_tile_classes

        t = time.perf_counter()
        summary["probe"] = probe_tile_classes(link, truths, seed=cfg.seed, questions=rows["heldout_questions"],
                                              geometry=cfg.geometry)
        timings["probe_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    atomic_write_json(out / "dataset.json", summary)
    return BuildResult(out, summary)
