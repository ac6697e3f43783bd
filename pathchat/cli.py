"""`pathchat <verb>`: each verb parses its flags and calls one typed library function.

Exit codes for batch verbs: 0 when every slide succeeded, 2 when some slides failed, 1 on a usage or
tool error (argparse's own usage exit code is remapped from 2 to 1 so that 2 always means "some
slides failed").
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _first_paragraph(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ")


def _verb(sub: argparse._SubParsersAction, name: str, fn: object) -> argparse.ArgumentParser:
    doc = getattr(fn, "__doc__", "")
    return sub.add_parser(name, help=_first_paragraph(doc), description=doc,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_tiling_flags(p: argparse.ArgumentParser, tile_size_default: int | None, mag_help: str) -> None:
    p.add_argument("slides", nargs="+", metavar="SLIDES", help="slide files or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="JOB", help="job folder")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--mag", type=float, help=mag_help)
    res.add_argument("--mpp", type=float, help="target resolution in µm per pixel")
    p.add_argument("--tile-size", type=int, default=tile_size_default,
                   help="tile side in pixels at the target resolution" + ("" if tile_size_default else
                                                                        " (default: the encoder's native size)"))
    p.add_argument("--overlap", type=int, default=0, help="overlap of neighbouring tiles in pixels")
    p.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue share of a tile (0 keeps all)")
    p.add_argument("--slide-mpp", type=float, help="level-0 µm/px of every slide, overriding the files")
    p.add_argument("--default-slide-mpp", type=float, help="level-0 µm/px for slides whose files record none")
    p.add_argument("--low-res", choices=("native", "error"), default="native",
                   help="slides coarser than the target: tile at their native resolution (warn) or fail")
    p.add_argument("--tissue-threshold", type=float,
                   help="fixed HSV-saturation threshold (0-255) instead of Otsu, for unusual stains")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _tile_config(args: argparse.Namespace, tile_px: int) -> Any:
    from pathchat.wsi.grid import TilingParams
    from pathchat.wsi.tile_job import TileJobConfig
    from pathchat.wsi.tissue import TissueParams

    tiling = TilingParams(magnification=args.mag, mpp=args.mpp, tile_px=tile_px, overlap_px=args.overlap,
                          min_tissue=args.min_tissue, low_resolution=args.low_res)
    tissue = TissueParams(saturation_threshold=args.tissue_threshold)
    return TileJobConfig(tiling=tiling, tissue=tissue, slide_mpp=args.slide_mpp,
                         default_slide_mpp=args.default_slide_mpp)


def _report(summary: Any, outputs: Path) -> int:
    for row in summary.failures:
        print(f"FAILED {row['slide_id']}: [{row['error_type']}] {row['message']}", file=sys.stderr)
    print(f"outputs: {outputs}")
    print(summary.line())
    return int(summary.exit_code)


def _add_tile(sub: argparse._SubParsersAction) -> None:
    from pathchat.wsi.tile_job import tile_slides

    p = _verb(sub, "tile", tile_slides)
    _add_tiling_flags(p, 256, "target magnification (default 20, i.e. 0.5 µm/px)")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel, one process each")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a slide's process is killed")
    p.set_defaults(func=_run_tile)


def _run_tile(args: argparse.Namespace) -> int:
    from pathchat.wsi.tile_job import tile_slides

    cfg = _tile_config(args, args.tile_size)
    summary = tile_slides(args.slides, args.out, cfg, workers=args.workers, timeout_s=args.timeout,
                          progress=not args.no_progress)
    return _report(summary, Path(args.out) / cfg.tiling.folder_name)


def _add_extract(sub: argparse._SubParsersAction) -> None:
    from pathchat.features.extract import extract_slides

    p = _verb(sub, "extract", extract_slides)
    _add_tiling_flags(p, None, "target magnification (default: the encoder's native one)")
    p.add_argument("--encoder", required=True, help="registry name (see `pathchat encoders`), hf:<repo> or timm:<name>")
    p.add_argument("--weights", help="local weights file or snapshot folder for the encoder")
    p.add_argument("--weights-map", help="YAML {encoder: local weights path} (default: $PATHCHAT_ENCODER_WEIGHTS)")
    p.add_argument("--random-weights", action="store_true", help="build the encoder with random weights (dry runs)")
    p.add_argument("--extra-mag", type=float, help="also extract a second, coarser magnification (e.g. 5)")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per encoder batch")
    p.add_argument("--workers", type=int, default=2, help="tile-decoding processes beside the encoder")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="encoder compute precision on GPU (auto: the encoder's recommended one; CPU runs fp32)")
    p.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32",
                   help="precision of the stored features")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda:$LOCAL_RANK when available)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a slide is killed and failed")
    p.set_defaults(func=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from pathchat.features.encoders import get_encoder_spec
    from pathchat.features.extract import ExtractJobConfig, RuntimeOptions, extract_slides

    spec = get_encoder_spec(args.encoder, weights=args.weights)
    if args.mag is None and args.mpp is None:
        args.mag = spec.magnification  # the encoder's native magnification
    tile_cfg = _tile_config(args, args.tile_size or spec.tile_px)
    cfg = ExtractJobConfig(encoder=args.encoder, weights=args.weights, weights_map=args.weights_map,
                           pretrained=not args.random_weights, tile=tile_cfg, extra_magnification=args.extra_mag,
                           feature_dtype=args.feature_dtype)
    runtime = RuntimeOptions(batch_size=args.batch_size, loader_workers=args.workers, device=args.device,
                             dtype=args.dtype)
    summary = extract_slides(args.slides, args.out, cfg, runtime, timeout_s=args.timeout,
                             progress=not args.no_progress)
    return _report(summary, Path(args.out))


def _add_encoders(sub: argparse._SubParsersAction) -> None:
    from pathchat.features.encoders import encoders_table

    p = _verb(sub, "encoders", encoders_table)
    p.add_argument("--weights-map", help="YAML {encoder: local weights path} (default: $PATHCHAT_ENCODER_WEIGHTS)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=_run_encoders)


def _run_encoders(args: argparse.Namespace) -> int:
    import json

    from pathchat.features.encoders import encoders_table, load_weights_map

    rows = encoders_table(load_weights_map(args.weights_map))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'name':<16} {'dim':>5} {'tile':>5} {'mag':>5}  {'source':<13} {'precision':<9} offline")
    for r in rows:
        print(f"{r['name']:<16} {r['dim']:>5} {r['tile_px']:>5} {r['magnification']:>5g}  {r['source']:<13} "
              f"{r['precision']:<9} {'yes' if r['offline'] else 'no'}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from pathchat.evaluation.runner import run_eval
    from pathchat.evaluation.tasks import TASKS

    p = _verb(sub, "eval", run_eval)
    p.add_argument("--task", choices=sorted(TASKS), help="benchmark task")
    p.add_argument("--data", help="the task's file (SlideBench JSON/CSV, WSI-VQA JSON, PathVQA JSON, JSONL)")
    p.add_argument("--model", help="checkpoint folder (model and tokenizer)")
    p.add_argument("--features", help="folder of <slide>.h5 feature files")
    p.add_argument("--out", help="output folder (results.json, results.md, predictions.jsonl)")
    p.add_argument("--predictions", help="score these answers instead of running a model: JSONL {id, text} "
                                         "or SlideChat's CSV with an Output column")
    p.add_argument("--config", help="YAML of eval settings (eval/*.yaml); flags override it")
    p.add_argument("--dry-run", action="store_true", help="print the task's counts as JSON and exit")
    p.add_argument("--batch-size", type=int, help="questions per generation batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, help="generation cap (default 64; 512 for reports)")
    p.add_argument("--consistency-repeats", type=int, help="asks with shuffled options per closed question (default 2)")
    p.add_argument("--no-controls", action="store_true", help="skip the shuffled- and zeroed-features controls")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--seed", type=int, help="seed of the slide derangement and option shuffles (default 0)")
    p.add_argument("--fail-on-missing", action="store_true", help="fail when a slide has no feature file")
    p.add_argument("--system-prompt", help="system message (default: the chat template's)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 …")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from pathchat.evaluation.runner import build_config, dry_run, run_eval
    from pathchat.features.store import FeatureFileError

    overrides = {k: getattr(args, k) for k in ("task", "data", "model", "features", "out", "predictions",
                                               "batch_size", "max_new_tokens", "consistency_repeats", "limit",
                                               "seed", "system_prompt", "device")}
    overrides.update(controls=False if args.no_controls else None, progress=False if args.no_progress else None,
                     fail_on_missing=True if args.fail_on_missing else None)
    if args.dry_run:
        cfg = build_config(args.config, **{**overrides, "out": args.out or "-"})
        print(json.dumps(dry_run(cfg), indent=1))
        return 0
    cfg = build_config(args.config, **overrides)
    try:
        result = run_eval(cfg)
    except (FeatureFileError, RuntimeError, OSError) as e:  # OSError: unreadable checkpoint (ManifestError)
        print(f"pathchat eval: error: {e}", file=sys.stderr)
        return 1
    print(f"outputs: {result.out}")
    print(f"asked {result.asked}, already done {result.skipped_done}; see {result.paths['markdown']}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _verb(sub, "train", _run_train)
    p.add_argument("config", metavar="CONFIG.yaml", help="stage config (train/*.yaml)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--dotted.key VALUE",
                   help="override config values, e.g. --training.learning_rate 1e-4 --lora.r 8")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    """Train one stage (align: connector only; instruct: connector + LLM, full or LoRA) from a YAML config.

    Any config value can be overridden with --section.key VALUE. A rerun resumes from the newest
    complete checkpoint in the output folder. Multi-GPU: launch the same command with
    `deepspeed`, `accelerate launch` or `torchrun` and set training.deepspeed to a JSON in
    train/deepspeed/. Prints one JSON line with the output folder and the final loss.
    """
    import json

    from pathchat.training.config import ConfigError, load_stage_config
    from pathchat.training.run import RunAlreadyCompleteError, train_stage

    try:
        cfg = load_stage_config(args.config, list(args.overrides))
    except ConfigError as e:
        print(f"pathchat train: error: {e}", file=sys.stderr)
        return 1
    logging.getLogger("pathchat").setLevel(logging.INFO)
    try:
        result = train_stage(cfg)
    except RunAlreadyCompleteError as e:
        print(f"pathchat train: {e}", file=sys.stderr)
        return 1
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"output_dir": str(result.output_dir), "stage": cfg.stage, "steps": result.global_step,
                          "final_loss": result.losses[-1] if result.losses else None,
                          "samples": result.num_samples, "answers": result.num_answers,
                          "skipped_records": result.skipped_records, "checkpoint": result.checkpoint_kind,
                          "resumed_from": result.resumed_from}))
    return 0


def _add_convert_zero(sub: argparse._SubParsersAction) -> None:
    p = _verb(sub, "convert-zero", _run_convert_zero)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint-N folder with DeepSpeed ZeRO shards")
    p.add_argument("--out", required=True, help="output folder for the safetensors checkpoint")
    p.set_defaults(func=_run_convert_zero)


def _run_convert_zero(args: argparse.Namespace) -> int:
    """Turn a DeepSpeed ZeRO checkpoint-N folder into a safetensors PathChat checkpoint (LoRA folded in)."""
    from pathchat.training.zero import convert_zero_checkpoint

    print(convert_zero_checkpoint(args.checkpoint, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pathchat", description="PathChat: talk to a whole-slide image. Research use only.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    _add_tile(sub)
    _add_extract(sub)
    _add_encoders(sub)
    _add_train(sub)
    _add_convert_zero(sub)
    _add_eval(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from pathchat.utils.batch import BatchSetupError
    from pathchat.features.encoders import EncoderError

    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, BatchSetupError, EncoderError) as e:
        print(f"pathchat {args.verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
