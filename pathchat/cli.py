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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _first_paragraph(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ")


def _add_tile(sub: argparse._SubParsersAction) -> None:
    from pathchat.wsi.tile_job import tile_slides

    p = sub.add_parser("tile", help=_first_paragraph(tile_slides.__doc__), description=tile_slides.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slides", nargs="+", metavar="SLIDES", help="slide files or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="JOB", help="job folder")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--mag", type=float, help="target magnification (default 20, i.e. 0.5 µm/px)")
    res.add_argument("--mpp", type=float, help="target resolution in µm per pixel")
    p.add_argument("--tile-size", type=int, default=256, help="tile side in pixels at the target resolution")
    p.add_argument("--overlap", type=int, default=0, help="overlap of neighbouring tiles in pixels")
    p.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue share of a tile (0 keeps all)")
    p.add_argument("--slide-mpp", type=float, help="level-0 µm/px of every slide, overriding the files")
    p.add_argument("--default-slide-mpp", type=float, help="level-0 µm/px for slides whose files record none")
    p.add_argument("--low-res", choices=("native", "error"), default="native",
                   help="slides coarser than the target: tile at their native resolution (warn) or fail")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel, one process each")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a slide's process is killed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_tile)


def _run_tile(args: argparse.Namespace) -> int:
    from pathchat.wsi.grid import TilingParams
    from pathchat.wsi.tile_job import TileJobConfig, tile_slides

    tiling = TilingParams(magnification=args.mag, mpp=args.mpp, tile_px=args.tile_size, overlap_px=args.overlap,
                          min_tissue=args.min_tissue, low_resolution=args.low_res)
    cfg = TileJobConfig(tiling=tiling, slide_mpp=args.slide_mpp, default_slide_mpp=args.default_slide_mpp)
    summary = tile_slides(args.slides, args.out, cfg, workers=args.workers, timeout_s=args.timeout,
                          progress=not args.no_progress)
    root = Path(args.out) / tiling.folder_name
    for row in summary.failures:
        print(f"FAILED {row['slide_id']}: [{row['error_type']}] {row['message']}", file=sys.stderr)
    print(f"outputs: {root}")
    print(summary.line())
    return summary.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pathchat", description="PathChat: talk to a whole-slide image. Research use only.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    _add_tile(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"pathchat {args.verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
