"""`pathchat eval`: ask a task's questions of a checkpoint (or score existing answers) and write the scores.

Every score comes with its negative controls, the same questions asked with the wrong slide's
features (a fixed-seed derangement across slides, positions and size included) and with zeroed
features (a blank slide: one all-zero tile at the origin, so no content, layout or amount of tissue
is left; zeroing only the features would leave the tile positions and count, from which a model
rightly reads where the tissue is and how much there is): a model that answers from the slide must
lose accuracy under both. Closed questions
are also asked with their options shuffled `consistency_repeats` times (fixed seeds); consistency is
the share answered with the same option content every time.

Generation is greedy and batched (`generate_batch`); every batch is appended to
`predictions.jsonl` before the next starts, so a rerun skips the (id, condition) pairs already done.
Questions whose slide has no feature file are counted and left out of the scores (or fail the run
with `fail_on_missing`). Outputs in `out`: `results.json`, `results.md`, `predictions.jsonl`,
`run_config.json`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pathchat.evaluation.answers import FAILED, parse_closed_answer
from pathchat.evaluation.metrics import (
    ClosedRecord,
    OpenRecord,
    closed_scores,
    consistency,
    exact_match,
    java_available,
    open_scores,
    parse_yes_no,
    report_scores,
)
from pathchat.evaluation.prompts import LETTERS
from pathchat.evaluation.tasks import Question, TaskData, load_task
from pathchat.utils.atomic import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

__all__ = [
    "CONDITION_SHUFFLED",
    "CONDITION_SLIDE",
    "CONDITION_ZEROED",
    "EvalConfig",
    "EvalResult",
    "FeatureResolver",
    "dry_run",
    "PredictionsFile",
    "read_predictions_file",
    "run_eval",
    "score_rows",
    "slide_derangement",
]

logger = logging.getLogger(__name__)

CONDITION_SLIDE = "slide"
CONDITION_SHUFFLED = "shuffled_features"
CONDITION_ZEROED = "zeroed_features"
ORDER_PREFIX = "option_order_"
DEFAULT_MAX_NEW_TOKENS = {"closed": 64, "open": 64, "report": 512}
# Settings that change what a prediction is; a rerun into the same --out must keep them.
BAD_PREDICTIONS = ("error", "failed")
_RUN_KEYS = ("task", "data", "model", "features", "predictions", "max_new_tokens", "seed", "system_prompt")


@dataclass
class EvalConfig:
    """Settings of one evaluation run (CLI flags and `eval/*.yaml` map onto these fields).

    Attributes:
        task: task name (`pathchat.evaluation.tasks.TASKS`).
        data: the task's file.
        out: output folder (needed to run, not for a dry run).
        model: checkpoint folder (model + tokenizer); None with `predictions`.
        features: folder of `<slide>.h5` feature files (needed with `model`).
        predictions: score this JSONL ({"id", "text"}) or SlideChat CSV (`Output` column) instead of
            running a model.
        batch_size: questions per generation batch.
        max_new_tokens: generation cap (None: 64 for closed and open, 512 for reports).
        consistency_repeats: extra asks of each closed question with shuffled options (0 = off).
        controls: also run the shuffled-features and zeroed-features controls.
        limit: evaluate only the first `limit` questions (in file order).
        seed: seeds the slide derangement and the option shuffles.
        fail_on_missing: a question whose slide has no feature file fails the run (default: counted, skipped).
        bad_predictions: with `predictions`, what a malformed line, a non-object row, a duplicate id or an
            empty file does: "error" (default) stops naming the file and line; "failed" counts every
            affected question, and every question the file does not answer, as FAILED (never dropped).
        system_prompt: system message (None: the chat template's default).
        device: "auto" (cuda when available), "cpu", "cuda:1", …
        progress: show a progress bar.
    """

    task: str
    data: str
    out: str | None = None
    model: str | None = None
    features: str | None = None
    predictions: str | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    consistency_repeats: int = 2
    controls: bool = True
    limit: int | None = None
    seed: int = 0
    fail_on_missing: bool = False
    bad_predictions: str = "error"
    system_prompt: str | None = None
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the flag at fault."""
        if self.out is None:
            raise ValueError("--out is required (or set out in the --config file)")
        if (self.model is None) == (self.predictions is None):
            raise ValueError("give exactly one of --model (run a checkpoint) or --predictions (score answers)")
        if self.model is not None and self.features is None:
            raise ValueError("--features DIR is needed with --model")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.consistency_repeats < 0:
            raise ValueError(f"--consistency-repeats must be >= 0, got {self.consistency_repeats}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.bad_predictions not in BAD_PREDICTIONS:
            raise ValueError(f"--bad-predictions must be one of {BAD_PREDICTIONS}, got {self.bad_predictions!r}")


@dataclass
class EvalResult:
    """What `run_eval` wrote: the results dict (also `out/results.json`) and the output paths."""

    results: dict[str, Any]
    out: Path
    asked: int = 0
    skipped_done: int = 0
    paths: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- features


class FeatureResolver:
    """Finds `<slide>.h5` in a features folder; a slide id that is a prefix of one file's stem (a TCGA
    patient barcode such as WSI-VQA's ``TCGA-LD-A74U`` for ``TCGA-LD-A74U-01Z-00-DX1``) also resolves,
    to the first stem in sorted order when several match."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"features folder not found: {self.folder}")
        self.stems = sorted(p.stem for p in self.folder.glob("*.h5"))
        self._stem_set = set(self.stems)
        self.prefix_matches: dict[str, list[str]] = {}

    def path(self, slide: str) -> Path | None:
        if slide in self._stem_set:
            return self.folder / f"{slide}.h5"
        if slide not in self.prefix_matches:
            self.prefix_matches[slide] = [s for s in self.stems if s.startswith(slide + "-")]
        matches = self.prefix_matches[slide]
        return self.folder / f"{matches[0]}.h5" if matches else None


class _FeatureCache:
    """Reads feature files as model inputs, keeping the most recently used few in memory."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._cache: OrderedDict[Path, Any] = OrderedDict()

    def get(self, path: Path) -> Any:
        """The file's `SlideTiles` (every tile: evaluation never samples)."""
        from pathchat.data.slide_features import tiles_from_bag
        from pathchat.features.store import read_features_h5

        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        item = tiles_from_bag(read_features_h5(path))
        self._cache[path] = item
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return item


def slide_derangement(slides: Sequence[str], seed: int) -> dict[str, str]:
    """Each slide -> a different slide, by a fixed-seed random cyclic permutation (Sattolo's algorithm).

    Empty for fewer than 2 slides (the shuffled control is then unavailable).
    """
    order = sorted(set(slides))
    if len(order) < 2:
        return {}
    perm = list(range(len(order)))
    rng = random.Random(seed)
    for i in range(len(perm) - 1, 0, -1):  # Sattolo: j < i, so the result is one cycle (no fixed point)
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return {order[i]: order[perm[i]] for i in range(len(order))}


def option_order(question_id: str, repeat: int, n_options: int, seed: int) -> tuple[int, ...]:
    """A fixed-seed shuffle of `n_options` (original indices in presented order) that is never the identity."""
    rng = random.Random(f"{seed}:{question_id}:{repeat}")
    order = list(range(n_options))
    for _ in range(100):
        rng.shuffle(order)
        if order != sorted(order):
            break
    return tuple(order)


# ---------------------------------------------------------------------------------------------- asks


@dataclass(frozen=True)
class _Ask:
    question: Question
    condition: str
    order: tuple[int, ...] | None  # closed: original option index at each presented position
    features_from: str | None  # slide whose features are shown (None for scored predictions)
    features_path: Path | None


def _score_row(q: Question, condition: str, text: str, order: tuple[int, ...] | None,
               features_from: str | None) -> dict[str, Any]:
    """One predictions.jsonl row: the raw text, the parsed answer and whether it is correct."""
    row: dict[str, Any] = {"id": q.id, "slide": q.slide, "condition": condition, "features_from": features_from,
                           "kind": q.kind, "text": text, "answer": q.answer}
    if q.kind == "closed":
        assert q.options is not None
        idx = order if order is not None else tuple(range(len(q.options)))
        parsed = parse_closed_answer(text, [q.options[i] for i in idx])
        choice = None if parsed.letter is None else LETTERS[idx[LETTERS.index(parsed.letter)]]
        row.update({"order": list(idx), "parsed": parsed.label, "parse_method": parsed.method,
                    "parse_reason": parsed.reason, "choice": choice, "correct": choice == q.answer})
    elif q.kind == "open" and q.category == "yes/no":
        yn = parse_yes_no(text)
        row.update({"parsed": yn if yn is not None else FAILED, "correct": yn == q.answer.lower()})
    elif q.kind == "open":
        row.update({"parsed": None, "correct": exact_match(text, q.answer)})
    else:
        row.update({"parsed": None, "correct": None})
    return row


def score_rows(questions: Sequence[Question], rows: Sequence[dict[str, Any]], reports: bool = True) -> dict[str, Any]:
    """Scores per condition from predictions rows (re-parsed from their raw text).

    Returns:
        ``{"conditions": {condition: {"n", "closed", "open", "report"}}, "consistency": {...}}``.
    """
    by_id = {q.id: q for q in questions}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if str(row.get("id")) in by_id:
            latest[(str(row["id"]), str(row["condition"]))] = row
    per_condition: dict[str, list[tuple[Question, dict[str, Any]]]] = defaultdict(list)
    orders: dict[str, dict[str, str | None]] = defaultdict(dict)
    for (qid, condition), row in sorted(latest.items()):
        q = by_id[qid]
        order = tuple(row["order"]) if row.get("order") is not None else None
        scored = _score_row(q, condition, str(row.get("text", "")), order, row.get("features_from"))
        if q.kind == "closed" and (condition.startswith(ORDER_PREFIX) or condition == CONDITION_SLIDE):
            orders[qid][condition] = scored["choice"]
        if not condition.startswith(ORDER_PREFIX):
            per_condition[condition].append((q, scored))
    out: dict[str, Any] = {"conditions": {}}
    for condition, items in per_condition.items():
        block: dict[str, Any] = {"n": len(items)}
        closed = [ClosedRecord(q.category, q.group, s["choice"], q.answer) for q, s in items if q.kind == "closed"]
        if closed:
            block["closed"] = closed_scores(closed)
            block["closed"]["letter_text_conflicts"] = sum(
                1 for q, s in items if q.kind == "closed" and _conflict(q, s))
        opened = [OpenRecord(q.category, q.group, s["text"], q.answer) for q, s in items if q.kind == "open"]
        if opened:
            block["open"] = open_scores(opened)
        reported = {q.id: s["text"] for q, s in items if q.kind == "report"}
        if reported:
            block["report"] = (report_scores({i: by_id[i].answer for i in reported}, reported) if reports
                               else {"n": len(reported), "skipped": "report metrics not computed"})
        out["conditions"][condition] = block
    with_orders = {qid: [v for _, v in sorted(c.items(), key=lambda kv: (kv[0] != CONDITION_SLIDE, kv[0]))]
                   for qid, c in orders.items() if any(k.startswith(ORDER_PREFIX) for k in c)}
    if with_orders:
        out["consistency"] = consistency(with_orders)
        shuffled = [ClosedRecord(by_id[qid].category, by_id[qid].group, v, by_id[qid].answer)
                    for qid, c in orders.items() for k, v in c.items() if k.startswith(ORDER_PREFIX)]
        out["consistency"]["shuffled_options_accuracy"] = closed_scores(shuffled)["overall"]["accuracy"]
    return out


def _conflict(q: Question, scored: dict[str, Any]) -> bool:
    assert q.options is not None
    idx = scored["order"]
    return parse_closed_answer(scored["text"], [q.options[i] for i in idx]).conflict


# ------------------------------------------------------------------------------------------ predictions


@dataclass
class PredictionsFile:
    """What a predictions file answers: question id -> text, and the questions its flaws touch.

    Attributes:
        answers: question id -> answer text.
        problems: "file: line n: what is wrong" for each flaw found (empty when the file is clean).
        affected: ids of questions answered by a flawed row (a duplicate id); scored as FAILED.
    """

    answers: dict[str, str]
    problems: list[str] = field(default_factory=list)
    affected: set[str] = field(default_factory=set)


def read_predictions_file(path: str | os.PathLike[str], questions: Sequence[Question],
                          bad_predictions: str = "error") -> PredictionsFile:
    """Answers from another system: question id -> text.

    Accepts JSONL ``{"id", "text"}`` (id: the question's id in its source, or its 0-based position
    there) or SlideChat's output CSV, whose row i answers question i in the `Output` column (when the
    CSV has a `Slide` column, every row's slide must match its question's).

    A malformed line, a row that is not an object, a duplicate id or an empty file is an error naming
    the file and the line; with ``bad_predictions="failed"`` each is recorded in ``problems`` instead
    (a duplicated id's question then counts as FAILED, as does every question left unanswered).

    Raises:
        ValueError: unreadable file, missing column or key, an unknown id, a slide mismatch, or (with
            "error") a malformed line, a duplicate id or an empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"predictions file not found: {p}")
    known = {q.id for q in questions}
    result = PredictionsFile({})

    def flaw(problem: str) -> None:
        if bad_predictions == "error":
            raise ValueError(f"{problem} (pass --bad-predictions failed to count the affected questions as FAILED)")
        logger.warning("%s; its question counts as FAILED", problem)
        result.problems.append(problem)

    def answer(where: str, qid: str, text: str) -> None:
        if qid in result.answers or qid in result.affected:
            flaw(f"{p}: {where}: id {qid!r} is answered twice")
            result.affected.add(qid)
            result.answers.pop(qid, None)
            return
        result.answers[qid] = text

    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e}); expected JSONL {{id, text}} or SlideChat's CSV") from e
    if not raw.strip():
        flaw(f"{p}: the file is empty (no answers)")
        return result
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(raw.splitlines())
        if reader.fieldnames is None or "Output" not in reader.fieldnames:
            raise ValueError(f"{p}: a SlideChat CSV needs an 'Output' column, and 'Slide' to check each row "
                             f"against its question (has {reader.fieldnames})")
        by_position = {q.id: q for q in questions}
        for i, row in enumerate(reader):
            q = by_position.get(str(i))
            if q is None:
                raise ValueError(f"{p}: row {i} has no question at position {i} (the task has {len(questions)})")
            if "Slide" in row and row["Slide"] and row["Slide"].strip() != q.slide:
                raise ValueError(f"{p}: row {i} is slide {row['Slide']!r} but question {i} is about {q.slide!r}")
            answer(f"row {i}", q.id, row["Output"] or "")
        return result
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            flaw(f"{p}: line {n}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            flaw(f"{p}: line {n}: expected a JSON object {{id, text}}, got {type(row).__name__}")
            continue
        if "id" not in row or "text" not in row:
            raise ValueError(f"{p}: line {n} needs 'id' and 'text' (has {sorted(row)})")
        qid = str(row["id"])
        if qid not in known:
            raise ValueError(f"{p}: line {n}: id {qid!r} is not a question of this task")
        answer(f"line {n}", qid, str(row["text"] if row["text"] is not None else ""))
    if not result.answers and not result.affected and not result.problems:
        flaw(f"{p}: no answers (only blank lines)")
    return result


# ------------------------------------------------------------------------------------------------ run


def _check_resume(cfg: EvalConfig, out: Path) -> None:
    """Refuse an `out` whose predictions came from other settings.

    A run_config.json binds the folder only once predictions were written beside it: a run that
    failed before answering anything (a bad file, a missing checkpoint) leaves nothing to protect,
    and the corrected rerun is not refused.
    """
    run_path = out / "run_config.json"
    current = {k: getattr(cfg, k) for k in _RUN_KEYS}
    if run_path.exists() and read_jsonl(out / "predictions.jsonl"):
        try:
            previous = json.loads(run_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{run_path}: unreadable ({e}); use a new --out to start afresh") from e
        changed = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
        if changed:
            raise ValueError(f"{out} holds a run with other settings {changed}; use a new --out to start afresh")


def _write_run_config(cfg: EvalConfig, out: Path) -> None:
    atomic_write_json(out / "run_config.json", {k: getattr(cfg, k) for k in _RUN_KEYS})


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _plan(cfg: EvalConfig, questions: Sequence[Question], resolver: FeatureResolver) -> tuple[list[_Ask], dict[str, Any]]:
    """Every (question, condition) to ask, and what could not be asked."""
    paths = {q.slide: resolver.path(q.slide) for q in questions}
    missing = sorted(s for s, p in paths.items() if p is None)
    if missing and cfg.fail_on_missing:
        raise FileNotFoundError(f"{len(missing)} slides have no feature file in {resolver.folder}, "
                                f"e.g. {missing[:5]}")
    present = [q for q in questions if paths[q.slide] is not None]
    derange = slide_derangement([q.slide for q in present], cfg.seed) if cfg.controls else {}
    asks: list[_Ask] = []
    for q in present:
        asks.append(_Ask(q, CONDITION_SLIDE, None, q.slide, paths[q.slide]))
        if q.kind == "closed" and q.options is not None:
            for r in range(1, cfg.consistency_repeats + 1):
                asks.append(_Ask(q, f"{ORDER_PREFIX}{r}", option_order(q.id, r, len(q.options), cfg.seed),
                                 q.slide, paths[q.slide]))
        if cfg.controls:
            if derange:
                other = derange[q.slide]
                asks.append(_Ask(q, CONDITION_SHUFFLED, None, other, paths[other]))
            asks.append(_Ask(q, CONDITION_ZEROED, None, q.slide, paths[q.slide]))
    info = {"questions": len(questions), "asked_questions": len(present),
            "missing_feature_questions": len(questions) - len(present),
            "missing_feature_slides": len(missing), "missing_slides_sample": missing[:20],
            "slides_by_prefix": sum(1 for s, p in paths.items() if p is not None and p.stem != s),
            "shuffled_control": bool(derange) if cfg.controls else None}
    return asks, info


def _check_feature_recipes(model: Any, paths: set[Path]) -> None:
    """Refuse features made another way than the checkpoint's recorded recipe (as the pipeline does).

    Raises:
        FeatureRecipeError: naming the file and both recipes.
    """
    from pathchat.features.store import read_feature_attrs
    from pathchat.inference.recipe import FeatureRecipe, recipe_of_model

    recipe = recipe_of_model(model.config)
    if recipe is None:
        logger.warning("the checkpoint records no feature recipe (it predates them): the features in "
                       "--features are not checked against it")
        return
    unchecked = []
    for path in sorted(paths):
        attrs = read_feature_attrs(path) if path.suffix.lower() in (".h5", ".hdf5") else {}
        if not attrs.get("encoder"):  # imported features (SlideChat CSV, old CLAM) name no encoder
            unchecked.append(path.name)
            continue
        recipe.check(FeatureRecipe.from_feature_attrs(attrs), str(path))
    if unchecked:
        logger.warning("%d feature files record no encoder, so their recipe cannot be checked against the "
                       "checkpoint's (%s), e.g. %s", len(unchecked), recipe.describe(), unchecked[0])


def _generate(cfg: EvalConfig, asks: list[_Ask], pred_path: Path) -> int:
    """Answer `asks` in batches, appending each batch's rows to `pred_path`. Returns how many were asked."""
    import torch
    from tqdm import tqdm

    from pathchat.inference.engine import generate_batch
    from pathchat.model.pretrained import load_pathchat

    assert cfg.model is not None
    device = _device(cfg.device)
    # Full, connector-only (stage 1) and LoRA checkpoints alike, told apart by their files.
    model, tokenizer = load_pathchat(cfg.model, device=device, merge_adapter=True)
    _write_run_config(cfg, pred_path.parent)  # only a run that can answer binds its folder
    _check_feature_recipes(model, {a.features_path for a in asks if a.features_path is not None})
    cache = _FeatureCache()
    # Same kind and slide together: similar prompt lengths and tile counts, and the cache stays warm.
    asks = sorted(asks, key=lambda a: (a.question.kind, str(a.features_from), a.condition, a.question.id))
    batches = [asks[i: i + cfg.batch_size] for i in range(0, len(asks), cfg.batch_size)]
    for batch in tqdm(batches, desc=f"eval {cfg.task}", unit="batch", disable=not cfg.progress):
        items: list[tuple[Any, Any, str]] = []
        sizes: list[Any] = []
        for a in batch:
            assert a.features_path is not None
            tiles = cache.get(a.features_path)
            if a.condition == CONDITION_ZEROED:
                blank = tiles.features.new_zeros(1, tiles.features.shape[1])
                origin = None if tiles.coords_um is None else tiles.coords_um.new_zeros(1, 2)
                items.append((blank, origin, a.question.prompt(a.order)))
                sizes.append(None)
            else:
                items.append((tiles.features, tiles.coords_um, a.question.prompt(a.order)))
                sizes.append(tiles.slide_size_um)
        if any(c is None for _, c, _ in items):
            items = [(f, None, t) for f, _, t in items]  # generate_batch takes coords for all or none
        max_new = cfg.max_new_tokens or max(DEFAULT_MAX_NEW_TOKENS[a.question.kind] for a in batch)
        with torch.no_grad():
            texts = generate_batch(model, tokenizer, items, max_new_tokens=max_new, system_prompt=cfg.system_prompt,
                                   slide_sizes=sizes)
        append_jsonl(pred_path, [_score_row(a.question, a.condition, t, a.order, a.features_from)
                                  for a, t in zip(batch, texts, strict=True)])
    return len(asks)


def run_eval(cfg: EvalConfig) -> EvalResult:
    """Ask a benchmark task's questions of a checkpoint (or score existing answers) and write the scores.

    Each score stands beside its negative controls (each question shown another slide's features, and
    zeroed features); closed questions are also asked with shuffled options (consistency). Writes
    `results.json`, `results.md` and `predictions.jsonl` into `out`; a rerun skips what is done.

    Raises:
        ValueError: bad settings, a malformed task or predictions file, or an `out` from another run.
        FileNotFoundError: a missing file or folder (or a missing feature file with `fail_on_missing`).
    """
    cfg.validate()
    start = time.perf_counter()
    task = load_task(cfg.task, cfg.data)
    questions = task.questions[: cfg.limit] if cfg.limit else list(task.questions)
    if any(q.kind == "report" for q in questions) and not java_available():
        raise RuntimeError("report metrics need java (pycocoevalcap); install a JRE before running")
    assert cfg.out is not None  # validate() checked it
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder")
    if cfg.predictions is not None:
        # Read and check the answers before anything is written, so a bad file leaves no trace in `out`.
        read = read_predictions_file(cfg.predictions, questions, cfg.bad_predictions)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(cfg, out)
    pred_path = out / "predictions.jsonl"
    done = {(str(r.get("id")), str(r.get("condition"))) for r in read_jsonl(pred_path)}
    coverage: dict[str, Any]
    asked = skipped = 0
    if cfg.predictions is not None:
        # Scoring is cheap and the file may have changed: always rewrite, never resume.
        as_failed = cfg.bad_predictions == "failed"
        missing = [q.id for q in questions if q.id not in read.answers and q.id not in read.affected]
        if missing and cfg.fail_on_missing:
            raise ValueError(f"{cfg.predictions}: no answer for {len(missing)} questions, e.g. {missing[:5]}")
        # With --bad-predictions failed, a question without a usable answer is scored as an empty (FAILED)
        # answer, never dropped: dropping it would raise the score.
        new = [_score_row(q, CONDITION_SLIDE, read.answers.get(q.id, ""), None, None) for q in questions
               if q.id in read.answers or as_failed]
        _write_run_config(cfg, out)
        atomic_write_text(pred_path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in new))
        asked = len(new)
        unscored = [] if as_failed else missing
        coverage = {"questions": len(questions), "asked_questions": len(questions) - len(unscored),
                    "missing_prediction_questions": len(unscored), "missing_ids_sample": unscored[:20],
                    "failed_unanswered_questions": len(missing) + len(read.affected) if as_failed else 0,
                    "prediction_file_problems": read.problems[:20]}
    else:
        assert cfg.features is not None and cfg.model is not None
        from pathchat.model.pretrained import checkpoint_kind

        checkpoint_kind(cfg.model)  # a damaged checkpoint is named before anything is planned
        asks, coverage = _plan(cfg, questions, FeatureResolver(cfg.features))
        if questions and not coverage["asked_questions"]:
            raise FileNotFoundError(f"no question can be asked: none of the {coverage['missing_feature_slides']} "
                                    f"slides has a feature file in {cfg.features}")
        todo = [a for a in asks if (a.question.id, a.condition) not in done]
        skipped = len(asks) - len(todo)
        asked = _generate(cfg, todo, pred_path) if todo else 0
    scores = score_rows(questions, read_jsonl(pred_path))
    results = {
        "task": task.name, "source": task.source, "model": cfg.model, "features": cfg.features,
        "predictions_file": cfg.predictions, "config": asdict(cfg), "task_counts": task.counts(),
        "coverage": coverage, **scores,
        "run": {"asked_now": asked, "skipped_done": skipped, "wall_s": round(time.perf_counter() - start, 2)},
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    return EvalResult(results, out, asked, skipped,
                      {"results": str(out / "results.json"), "markdown": str(out / "results.md"),
                       "predictions": str(pred_path)})


# --------------------------------------------------------------------------------------------- markdown


def _pct(block: dict[str, Any] | None, key: str = "accuracy") -> str:
    if not block or block.get(key) is None:
        return "–"
    return f"{100 * block[key]:.1f}"


def _md_header(results: dict[str, Any]) -> list[str]:
    """Title, source, and how many questions were asked, not scored or scored as FAILED."""
    coverage = results["coverage"]
    lines = [f"# {results['task']}: {results.get('model') or results.get('predictions_file')}", "",
             f"Source: `{results['source']}`  ",
             f"Questions asked: {coverage.get('asked_questions')} of {coverage['questions']}"]
    missing = coverage.get("missing_feature_questions") or coverage.get("missing_prediction_questions")
    if missing:
        lines.append(f"  \n**Not scored: {missing} questions** (no features / no prediction).")
    failed_unanswered = coverage.get("failed_unanswered_questions")
    if failed_unanswered:
        lines.append(f"  \n**Scored as FAILED: {failed_unanswered} questions** without a usable answer in the "
                     "predictions file (`--bad-predictions failed`).")
    return [*lines, ""]


def _md_closed(conds: dict[str, Any], names: list[str]) -> list[str]:
    """Closed accuracy per category, group and overall, one column per condition, and the FAILED row."""
    closed = {n: conds[n].get("closed") for n in names}
    main = closed.get(CONDITION_SLIDE)
    if not main:
        return []
    lines = ["## Closed questions (accuracy %)", "", "| | n | " + " | ".join(f"{n} %" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for section in ("categories", "groups"):
        for key, block in main[section].items():
            row = [f"{'group: ' if section == 'groups' else ''}{key}", str(block["n"])]
            row += [_pct((closed[n] or {}).get(section, {}).get(key)) for n in names]
            lines.append("| " + " | ".join(row) + " |")
    row = ["**overall**", str(main["overall"]["n"])]
    row += [f"**{_pct((closed[n] or {}).get('overall'))}**" for n in names]
    lines.append("| " + " | ".join(row) + " |")
    lines.append("| FAILED (no parsable answer) | | " + " | ".join(
        str((closed[n] or {}).get("overall", {}).get("failed", "–")) for n in names) + " |")
    return [*lines, ""]


def _md_consistency(results: dict[str, Any]) -> list[str]:
    if "consistency" not in results:
        return []
    c = results["consistency"]
    return [f"Option-order consistency: {_pct(c, 'share')} % of {c['n']} questions answered with the same "
            f"option in every order; accuracy with shuffled options {_pct(c, 'shuffled_options_accuracy')} %.", ""]


def _md_open(conds: dict[str, Any], names: list[str]) -> list[str]:
    """Open-question metrics overall and per category, one column per condition."""
    opened = {n: conds[n].get("open") for n in names}
    if not opened.get(CONDITION_SLIDE):
        return []
    main_open = opened[CONDITION_SLIDE] or {}
    lines = ["## Open questions (%)", "", "| | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    sections = [("overall", "**overall**", main_open.get("overall", {}))]
    sections += [(f"categories/{k}", k, v) for k, v in main_open.get("categories", {}).items()]
    for path, label, block in sections:
        for metric in ("exact_match", "token_f1", "yes_no_accuracy", "yes_no_failed"):
            if metric not in block:
                continue
            n_key = "n_yes_no" if metric.startswith("yes_no") else "n_open"
            cells = []
            for n in names:
                b = opened[n] or {}
                for part in path.split("/"):
                    b = b.get(part, {})
                cells.append(str(b.get(metric, "–")) if metric == "yes_no_failed" else _pct(b, metric))
            lines.append(f"| {label}: {metric.replace('_', ' ')} | {block.get(n_key, '')} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _md_reports(conds: dict[str, Any], names: list[str]) -> list[str]:
    """Report metrics (BLEU, METEOR, ROUGE-L, CIDEr), one column per condition."""
    reports = {n: conds[n].get("report") for n in names}
    if not reports.get(CONDITION_SLIDE):
        return []
    metrics = [k for k in reports[CONDITION_SLIDE] or {} if k not in ("n", "skipped")]
    lines = ["## Reports", "", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(f"{(reports[n] or {}).get(m, float('nan')):.4f}" for n in names) + " |")
    return [*lines, ""]


def _md_controls(names: list[str]) -> str:
    if len(names) > 1:
        return (f"Controls: `{CONDITION_SHUFFLED}` shows each question another slide's features, "
                f"`{CONDITION_ZEROED}` shows a blank slide (one all-zero tile at the origin); a model that "
                "reads the slide scores lower under both.")
    return "Controls: not run (scored existing predictions, or `--no-controls`)."


def results_markdown(results: dict[str, Any]) -> str:
    """A readable summary: closed accuracy per category / group / overall beside the controls, open and
    report scores, consistency, FAILED and coverage."""
    conds = results.get("conditions", {})
    names = [c for c in (CONDITION_SLIDE, CONDITION_SHUFFLED, CONDITION_ZEROED) if c in conds]
    lines = [*_md_header(results), *_md_closed(conds, names), *_md_consistency(results), *_md_open(conds, names),
             *_md_reports(conds, names), _md_controls(names)]
    return "\n".join(lines) + "\n"


def dry_run(cfg: EvalConfig) -> dict[str, Any]:
    """Parse the task (and look up feature files when `features` is set) without running anything."""
    task = load_task(cfg.task, cfg.data)
    questions = task.questions[: cfg.limit] if cfg.limit else task.questions
    counts = task.counts() if not cfg.limit else TaskData(task.name, task.source, list(questions), task.stats).counts()
    if cfg.features is not None:
        resolver = FeatureResolver(cfg.features)
        slides = sorted({q.slide for q in questions})
        missing = [s for s in slides if resolver.path(s) is None]
        counts["features"] = {"folder": cfg.features, "slides_with_features": len(slides) - len(missing),
                              "slides_missing": len(missing), "missing_sample": missing[:20]}
    return counts
