"""`pathchat <verb>`: each verb is one typed function; its signature and docstring are its flags and `--help`.

How to add a verb: write a typed function whose docstring has an ``Args:`` line per parameter (plain
parameters become flags, `tile_size` -> `--tile-size`, a bool `progress` -> `--progress/--no-progress`,
a dataclass parameter one flag per field), then add one entry to `VERBS` below:
``"chat": Verb("pathchat.inference.chat:chat", positionals=("slide",))``. The function returns an exit
code (None means 0) or a `BatchSummary` (printed, exit 0 / 2). Flags, defaults, YAML (`--config`) and
errors all come from `pathchat.utils.config` (jsonargparse); nothing is declared twice.

Exit codes: 0 when everything succeeded, 2 when some slides failed (batch verbs), 1 on a usage or tool
error (a bad flag, a bad value refused by a config's checks, a missing file).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pathchat.evaluation.runner import EvalConfig
from pathchat.features.extract import ExtractJobConfig, RuntimeOptions
from pathchat.training.config import StageConfig
from pathchat.utils.batch import BatchSummary
from pathchat.utils.config import ConfigError, SignatureParser, explain, new_parser
from pathchat.wsi.grid import TilingParams
from pathchat.wsi.tile_job import EdgePixels, TileJobConfig, tile_slides
from pathchat.wsi.tissue import TissueParams

__all__ = ["VERBS", "TilingFlags", "Verb", "build_parser", "main", "show_batch", "verb_parser"]


def _default(fn: Callable[..., Any], name: str) -> Any:
    """A library function's default, so that a verb wrapping it cannot drift from it."""
    return inspect.signature(fn).parameters[name].default


def show_batch(summary: BatchSummary, outputs: str | os.PathLike[str] | None = None) -> int:
    """Print a batch verb's failures, no-tissue slides and ignored files (stderr), output folder and
    done / no_tissue / skipped / failed line; its exit code."""
    for row in summary.failures:
        print(f"FAILED {row['slide_id']}: [{row['error_type']}] {row['message']}", file=sys.stderr)
    for slide_id in summary.no_tissue_slides:
        print(f"NO TISSUE {slide_id}: no tile has usable tissue (outputs written, 0 tiles)", file=sys.stderr)
    for path, reason in summary.ignored:
        print(f"IGNORED FILE {path}: {reason}", file=sys.stderr)
    if outputs is not None:
        print(f"outputs: {outputs}")
    print(summary.line())
    return int(summary.exit_code)


# ---------------------------------------------------------------------------------------------- verbs


@dataclass(frozen=True)
class TilingFlags:
    """The tiling flags that `tile` and `extract` share (defaults from `TilingParams` and `TileJobConfig`).

    Attributes:
        mag: target magnification (default 20x, i.e. 0.5 µm/px, for tile; the encoder's native one for extract).
        mpp: target resolution in µm per pixel (instead of --mag).
        overlap: overlap of neighbouring tiles in pixels.
        min_tissue: minimum tissue share of a tile (0 keeps all).
        slide_mpp: level-0 µm/px of every slide, overriding the files.
        default_slide_mpp: level-0 µm/px for slides whose files record none.
        low_res: slides coarser than the target: tile at their native resolution (warn) or fail.
        tissue_threshold: fixed HSV-saturation threshold (0-255) instead of Otsu, for unusual stains.
        edge_pixels: tile pixels past the slide edge: black as TRIDENT and CLAM read them, or white.
    """

    mag: float | None = None
    mpp: float | None = None
    overlap: int = TilingParams.overlap_px
    min_tissue: float = TilingParams.min_tissue
    slide_mpp: float | None = TileJobConfig.slide_mpp
    default_slide_mpp: float | None = TileJobConfig.default_slide_mpp
    low_res: Literal["native", "error"] = "native"
    tissue_threshold: float | None = TissueParams.saturation_threshold
    edge_pixels: EdgePixels = TileJobConfig.edge_pixels

    def job_config(self, tile_px: int, magnification: float | None = None) -> TileJobConfig:
        """The `TileJobConfig` these flags describe (`magnification` where neither --mag nor --mpp is given);
        its checks raise ValueError naming the flag."""
        mag = self.mag if self.mag is not None or self.mpp is not None else magnification
        tiling = TilingParams(magnification=mag, mpp=self.mpp, tile_px=tile_px,
                              overlap_px=self.overlap, min_tissue=self.min_tissue, low_resolution=self.low_res)
        return TileJobConfig(tiling=tiling, tissue=TissueParams(saturation_threshold=self.tissue_threshold),
                             slide_mpp=self.slide_mpp, default_slide_mpp=self.default_slide_mpp,
                             edge_pixels=self.edge_pixels)


def tile(slides: list[str], out: str, tiling: TilingFlags, tile_size: int = TilingParams.tile_px, workers: int = _default(tile_slides, "workers"),
         timeout: float = _default(tile_slides, "timeout_s"), progress: bool = True) -> int:
    """Tile every slide under `slides` (files or folders, searched recursively) into the job folder.

    Writes, per slide under JOB/<mag>x_<tile>px_<overlap>px_overlap/: patches/<slide>_patches.h5 (coordinates),
    visualization/<slide>.png (QC) and contours_geojson/<slide>.geojson. Reruns skip finished slides.

    Args:
        slides: slide files or folders (searched recursively).
        out: job folder.
        tiling: tiling settings.
        tile_size: tile side in pixels at the target resolution.
        workers: slides processed in parallel, one process each.
        timeout: seconds before a slide's process is killed.
        progress: show a progress bar.
    """
    cfg = tiling.job_config(tile_size)
    summary = tile_slides(slides, out, cfg, workers=workers, timeout_s=timeout, progress=progress)
    return show_batch(summary, Path(out) / cfg.tiling.folder_name)


def extract(slides: list[str], out: str, encoder: str, tiling: TilingFlags, tile_size: int | None = None,
            weights: str | None = None,
            weights_map: str | None = None, random_weights: bool = False, extra_mag: float | None = None,
            batch_size: int = RuntimeOptions.batch_size, workers: int = RuntimeOptions.loader_workers,
            dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto",
            feature_dtype: Literal["float32", "float16"] = "float32", device: str = RuntimeOptions.device,
            timeout: float = 3600.0, progress: bool = True) -> int:
    """Extract tile features of every slide under `slides` into the job folder (tiling first where needed).

    Resumable: a rerun skips slides whose features still match the slide, the encoder and the settings.
    Several processes (`torchrun`, `accelerate launch`, or plain copies of this command) may share one job.

    Args:
        slides: slide files or folders (searched recursively).
        out: job folder.
        encoder: registry name (see `pathchat encoders`), hf:<repo> or timm:<name>.
        tiling: tiling settings.
        tile_size: tile side in pixels at the target resolution (null: the encoder's native size).
        weights: local weights file or snapshot folder for the encoder.
        weights_map: YAML {encoder: local weights path} (default: $PATHCHAT_ENCODER_WEIGHTS).
        random_weights: build the encoder with random weights (dry runs).
        extra_mag: also extract a second, coarser magnification (e.g. 5).
        batch_size: tiles per encoder batch.
        workers: tile-decoding processes beside the encoder.
        dtype: encoder compute precision on GPU (auto: the encoder's recommended one; CPU runs fp32).
        feature_dtype: precision of the stored features.
        device: cpu, cuda, cuda:1 … (auto: cuda:$LOCAL_RANK when available).
        timeout: seconds before a slide is killed and failed.
        progress: show a progress bar.
    """
    from pathchat.features.encoders import get_encoder_spec
    from pathchat.features.extract import extract_slides

    spec = get_encoder_spec(encoder, weights=weights)
    cfg = ExtractJobConfig(encoder=encoder, weights=weights, weights_map=weights_map, pretrained=not random_weights,
                           tile=tiling.job_config(tile_size or spec.tile_px, spec.magnification),
                           extra_magnification=extra_mag, feature_dtype=feature_dtype)
    runtime = RuntimeOptions(batch_size=batch_size, loader_workers=workers, device=device, dtype=dtype)
    summary = extract_slides(slides, out, cfg, runtime, timeout_s=timeout, progress=progress)
    return show_batch(summary, Path(out))


def encoders(weights_map: str | None = None, json: bool = False) -> int:
    """List the tile-encoder registry: dim, tile size, magnification, source, precision, offline availability.

    Args:
        weights_map: YAML {encoder: local weights path} (default: $PATHCHAT_ENCODER_WEIGHTS).
        json: print JSON lines instead of a table.
    """
    import json as json_lib

    from pathchat.features.encoders import encoders_table, load_weights_map

    rows = encoders_table(load_weights_map(weights_map))
    if json:
        for row in rows:
            print(json_lib.dumps(row))
        return 0
    print(f"{'name':<16} {'dim':>5} {'tile':>5} {'mag':>5}  {'source':<13} {'precision':<9} offline")
    for r in rows:
        print(f"{r['name']:<16} {r['dim']:>5} {r['tile_px']:>5} {r['magnification']:>5g}  {r['source']:<13} "
              f"{r['precision']:<9} {'yes' if r['offline'] else 'no'}")
    return 0


def train(config: StageConfig) -> int:
    """Train one stage (align: connector only; instruct: connector + LLM, full or LoRA) from a YAML config.

    Usage: pathchat train CONFIG.yaml [--SECTION.KEY VALUE …]; any key of the YAML (below) is a flag, and
    flags override the file. A rerun resumes from the newest complete checkpoint in the output folder.
    Multi-GPU: launch the same command with `deepspeed`, `accelerate launch` or `torchrun` and set
    training.deepspeed to a JSON in train/deepspeed/. Prints one JSON line with the output folder and the
    final loss.

    Args:
        config: the stage config.
    """
    import json

    from pathchat.training.run import RunAlreadyCompleteError, train_stage

    logging.getLogger("pathchat").setLevel(logging.INFO)
    try:
        result = train_stage(config)
    except RunAlreadyCompleteError as e:
        print(f"pathchat train: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"output_dir": str(result.output_dir), "stage": config.stage, "steps": result.global_step,
                          "final_loss": result.losses[-1] if result.losses else None,
                          "samples": result.num_samples, "answers": result.num_answers,
                          "skipped_records": result.skipped_records, "checkpoint": result.checkpoint_kind,
                          "resumed_from": result.resumed_from}))
    return 0


def convert_zero(checkpoint: str, out: str) -> int:
    """Turn a DeepSpeed ZeRO checkpoint-N folder into a safetensors PathChat checkpoint (LoRA folded in).

    Args:
        checkpoint: a checkpoint-N folder with DeepSpeed ZeRO shards.
        out: output folder for the safetensors checkpoint.
    """
    from pathchat.training.zero import convert_zero_checkpoint

    print(convert_zero_checkpoint(checkpoint, out))
    return 0


def evaluate(config: EvalConfig, dry_run: bool = False) -> int:
    """Score a checkpoint (or existing answers) on a benchmark task, each score beside its controls.

    Tasks: slidebench, wsi-vqa, pathvqa, report, synthetic, questions. Writes results.json,
    results.md and predictions.jsonl into --out; a rerun skips what is done. Settings may come from a
    task YAML (--config eval/<task>.yaml); flags override it.

    Args:
        config: the evaluation settings.
        dry_run: print the task's counts as JSON and exit.
    """
    import json

    from pathchat.evaluation.runner import dry_run as count_task
    from pathchat.evaluation.runner import run_eval
    from pathchat.features.store import FeatureFileError

    if dry_run:
        print(json.dumps(count_task(config), indent=1))
        return 0
    try:
        result = run_eval(config)
    except (FeatureFileError, RuntimeError, OSError) as e:  # OSError: unreadable checkpoint (ManifestError)
        print(f"pathchat eval: error: {e}", file=sys.stderr)
        return 1
    print(f"outputs: {result.out}")
    print(f"asked {result.asked}, already done {result.skipped_done}; see {result.paths['markdown']}")
    return 0


# ------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Verb:
    """One `pathchat` verb.

    Attributes:
        run: the typed function, or "module:function" (imported only when the parser is built).
        positionals: parameters given by position rather than by flag.
        config_file: accept `--config FILE.yaml` holding the same keys as the flags.
        config_positional: the first argument, when it is not a flag, is the config file (`train CONFIG.yaml`).
    """

    run: Callable[..., Any] | str
    positionals: tuple[str, ...] = ()
    config_file: bool = False
    config_positional: bool = False

    def function(self) -> Callable[..., Any]:
        if not isinstance(self.run, str):
            return self.run
        module, _, name = self.run.partition(":")
        fn: Callable[..., Any] = getattr(importlib.import_module(module), name)
        return fn


VERBS: dict[str, Verb] = {
    "tile": Verb(tile, positionals=("slides",)),
    "extract": Verb(extract, positionals=("slides",)),
    "encoders": Verb(encoders),
    "train": Verb(train, config_file=True, config_positional=True),
    "convert-zero": Verb(convert_zero, positionals=("checkpoint",)),
    "eval": Verb(evaluate, config_file=True),
    "serve": Verb("pathchat.serve.server:serve_cli"),
    "report": Verb("pathchat.inference.report:report", positionals=("slides",)),
    "chat": Verb("pathchat.inference.chat:chat", positionals=("slide",)),
}


def verb_parser(name: str) -> tuple[Any, SignatureParser]:
    """The jsonargparse parser of one verb, and the adapter that calls its function."""
    spec = VERBS[name]
    sig = SignatureParser(spec.function(), spec.positionals, spec.config_file)
    parser = new_parser(f"pathchat {name}", sig.description)
    return sig.add_to(parser), sig


def build_parser() -> Any:
    """`pathchat` with every verb as a subcommand (for `pathchat --help` and argument checking)."""
    parser = new_parser("pathchat", "PathChat: talk to a whole-slide image. Research use only.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subcommands(dest="verb", required=True)
    for name in VERBS:
        verb, sig = verb_parser(name)
        sub.add_subcommand(name, verb, help=sig.description.split("\n")[0])
    return parser


def split_verb(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(flags before the verb, the verb, the verb's arguments), with `train CONFIG.yaml` -> `--config`."""
    for i, tok in enumerate(argv):
        if not tok.startswith("-"):
            rest = argv[i + 1:]
            spec = VERBS.get(tok)
            if spec is not None and spec.config_positional and rest and not rest[0].startswith("-"):
                rest = ["--config", *rest]
            return argv[:i], tok, rest
    return argv, None, []


def _unexpected(verb: str, error: BaseException, verbose: bool) -> int:
    """An error no check foresaw: one line naming its type and message (the traceback only with -v); exit 1."""
    if verbose:
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    message = " ".join(str(error).split()) or "(no message)"
    hint = "" if verbose else " (run with -v for the traceback)"
    print(f"pathchat {verb}: error: {type(error).__name__}: {message}{hint}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run `pathchat ARGV`; returns the exit code (`--help` exits 0 through SystemExit, as argparse does)."""
    from pathchat.features.encoders import EncoderError
    from pathchat.utils.batch import BatchSetupError

    head, name, rest = split_verb(list(sys.argv[1:] if argv is None else argv))
    if name not in VERBS:
        if {"-h", "--help"} & set(head):
            build_parser().parse_args(["--help"])  # prints every verb and exits 0
        problem = f"unknown verb {name!r}" if name else "a verb is required"
        print(f"pathchat: error: {problem}; choose one of {', '.join(VERBS)} (see: pathchat --help)",
              file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.DEBUG if {"-v", "--verbose"} & set(head) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    parser, sig = verb_parser(name)
    try:
        values = parser.parse_args(rest)
    except Exception as e:  # jsonargparse raises ArgumentError, or the TypeError/ValueError behind it
        print(f"pathchat {name}: error: {explain(e, parser, rest)}", file=sys.stderr)
        print(f"(see: pathchat {name} --help)", file=sys.stderr)
        return 1
    try:
        result = sig.call(values, parser)
    except (ConfigError, ValueError, FileNotFoundError, BatchSetupError, EncoderError) as e:
        message = " ".join(str(e).split())
        print(f"pathchat {name}: error: {message}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - any other failure is still one line; -v shows the traceback
        return _unexpected(name, e, verbose=bool({"-v", "--verbose"} & set(head)))
    if isinstance(result, BatchSummary):
        return show_batch(result)
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())

