"""A cheap learnability check: can a linear probe read each tile's tissue class from its features?

If a logistic regression on standardised tile features, fitted on the training slides, names the
class of held-out slides' tiles, then the content questions (presence, dominant class) are answerable
from the features; layout questions also need the tile coordinates, which the connector receives.
`probe_answers` goes one step further: it answers every held-out closed question from the probe's
tile classes plus the tile coordinates alone (pieces = connected tiles, place = their centre), which
shows each question type is answerable from exactly what the model is given.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from data_recipes.synthetic.layout import CLASS_NAMES, QUADRANTS, RECIPE_CLASSES, Geometry
from data_recipes.synthetic.questions import QUESTION_TYPES
from data_recipes.synthetic.truth import SlideTruth
from pathchat.features.store import read_features_h5


def _tiles(features_dir: Path, truths: list[SlideTruth]) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for truth in truths:
        bag = read_features_h5(features_dir / f"{truth.slide_id}.h5")
        feats.append(np.asarray(bag.features, np.float32))
        labels += [RECIPE_CLASSES.index(c) for c in truth.tile_labels]
    return np.concatenate(feats), np.asarray(labels, np.int64)


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0, steps: int = 100,
                 weight_decay: float = 1e-4) -> torch.nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic for a seed)."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss = loss + weight_decay * (model.weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def _read_slide(pred: np.ndarray, l0_coords: np.ndarray, geometry: Geometry) -> dict[str, Any]:
    """Answers from predicted tile classes `[n]` and tile corners `[n, 2]` only."""
    g, t = geometry.grid_tiles, geometry.tile_px
    cols, rows = l0_coords[:, 0] // t, l0_coords[:, 1] // t
    grid = np.zeros((g, g), np.uint8)
    grid[rows, cols] = 1
    n_pieces, labels = cv2.connectedComponents(grid, connectivity=8)
    piece_of = labels[rows, cols]
    names = [CLASS_NAMES[RECIPE_CLASSES[k]] for k in pred]
    places: dict[str, list[str]] = {}
    for piece in range(1, n_pieces):
        mine = piece_of == piece
        cls = Counter(n for n, m in zip(names, mine, strict=True) if m).most_common(1)[0][0]
        cx, cy = (l0_coords[mine] + t / 2).mean(axis=0) / (g * t)
        places.setdefault(cls, []).append(QUADRANTS[2 * int(cy >= 0.5) + int(cx >= 0.5)])
    counts = Counter(names)
    return {"present": set(counts), "dominant": counts.most_common(1)[0][0], "region_count": str(n_pieces - 1),
            "tissue_amount": geometry.amount_of(len(pred)),
            "location": {c: p[0] for c, p in places.items() if len(p) == 1}}


def probe_answers(questions: list[dict[str, Any]], predictions: dict[str, np.ndarray],
                  coords: dict[str, np.ndarray], geometry: Geometry) -> dict[str, float]:
    """Accuracy per closed question type of answers read from predicted tile classes and coordinates.

    Args:
        questions: held-out evaluation rows (CONTRACTS.md schema).
        predictions: slide id -> predicted class index per tile; coords: slide id -> tile corners.
    """
    asked = {w.format(cls=name): name for w in QUESTION_TYPES["location"].wordings for name in CLASS_NAMES.values()}
    reads = {sid: _read_slide(predictions[sid], coords[sid], geometry) for sid in predictions}
    hits: dict[str, list[bool]] = {}
    for q in questions:
        if q["kind"] != "closed":
            continue
        read, cat, options = reads[q["slide"]], q["category"], q["options"]
        if cat == "presence":
            guess = next((o for o in options if o in read["present"]), None)
        elif cat == "location":
            guess = read["location"].get(asked[q["question"]])
        else:
            guess = read[cat]
        right = options[ord(q["answer"]) - ord("A")]
        hits.setdefault(cat, []).append(guess == right)
    return {cat: round(float(np.mean(h)), 4) for cat, h in sorted(hits.items())}


def probe_tile_classes(features_dir: str | os.PathLike[str], truths: dict[str, list[SlideTruth]],
                       seed: int = 0, questions: list[dict[str, Any]] | None = None,
                       geometry: Geometry | None = None) -> dict[str, Any]:
    """Fit on the training slides' tiles, score on the held-out slides' tiles.

    Args:
        questions, geometry: when given, also answer the held-out closed questions from the probe's
            tile classes and the tile coordinates (`probe_answers`).
    Returns:
        tile accuracy on held-out slides, per-class accuracy, the majority-class baseline, tile counts,
        the share of held-out slides whose set of present classes is recovered exactly from the
        probe's tile predictions, and (with `questions`) per-type accuracy of the rule-based reader.
    """
    features_dir = Path(features_dir)
    x_train, y_train = _tiles(features_dir, truths["train"])
    x_test, y_test = _tiles(features_dir, truths["heldout"])
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    model = fit_logistic((x_train - mean) / std, y_train, len(RECIPE_CLASSES), seed=seed)
    with torch.no_grad():
        pred = model(torch.from_numpy((x_test - mean) / std)).argmax(dim=1).numpy()
    per_class = {c: round(float((pred[y_test == k] == k).mean()), 4)
                 for k, c in enumerate(RECIPE_CLASSES) if (y_test == k).any()}
    exact_sets, start = 0, 0
    per_slide: dict[str, np.ndarray] = {}
    for truth in truths["heldout"]:
        per_slide[truth.slide_id] = pred[start:start + truth.n_tiles]
        exact_sets += {RECIPE_CLASSES[k] for k in per_slide[truth.slide_id]} == set(truth.present)
        start += truth.n_tiles
    result: dict[str, Any] = {
        "task": "tile tissue class from features (logistic regression, train slides -> held-out slides)",
        "heldout_tile_accuracy": round(float((pred == y_test).mean()), 4),
        "per_class_accuracy": per_class,
        "majority_class_baseline": round(float(np.bincount(y_test).max() / len(y_test)), 4),
        "heldout_slides_present_classes_exact": round(exact_sets / max(1, len(truths["heldout"])), 4),
        "train_tiles": int(len(y_train)),
        "train_tiles_per_class": {c: int((y_train == k).sum()) for k, c in enumerate(RECIPE_CLASSES)},
        "heldout_tiles": int(len(y_test)),
    }
    if questions is not None and geometry is not None:
        coords = {}
        for sid in per_slide:
            bag = read_features_h5(features_dir / f"{sid}.h5")
            if bag.coords is None:
                raise ValueError(f"{features_dir / sid}.h5: no coords")
            coords[sid] = bag.coords
        result["closed_accuracy_from_probe_and_coords"] = probe_answers(questions, per_slide, coords, geometry)
    return result
