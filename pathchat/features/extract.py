"""`pathchat extract`: tiles -> frozen encoder -> one features h5 per slide and encoder.

Each worker process loads the encoder once (`setup`) and keeps it for every slide it is given; the
batch layer replaces a worker that crashes or hangs. Inside a worker, DataLoader processes decode
tiles while the encoder runs, so decoding and encoding overlap. Coordinates come from an earlier
`pathchat tile` of the same job when they match the slide and the tiling settings; otherwise the
slide is tiled first. Corrupt tiles are skipped and recorded (`failed_coords` in the features file).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathchat.features.encoders import LoadedEncoder, get_encoder_spec, load_encoder, load_weights_map
from pathchat.features.encoders.spec import PRECISIONS
from pathchat.features.store import FeatureBag, features_path, write_features_h5
from pathchat.utils.batch import BatchRunner, BatchSummary, fingerprint_slide, params_key
from pathchat.utils.checks import check_out_folder, check_positive
from pathchat.wsi.coords import TileCoords, read_coords_h5
from pathchat.wsi.discovery import SlideSource, find_slides_or_fail
from pathchat.wsi.errors import SlideError
from pathchat.wsi.reader import TileDataset, TileFailure, tile_loader
from pathchat.wsi.tile_job import TileJobConfig, find_coords_file, output_paths, tile_one


@dataclass(frozen=True)
class ExtractJobConfig:
    """Everything that decides a slide's features; a change of any field makes a rerun redo it."""

    encoder: str = "random-vit-tiny"  # registry name, or hf:<repo> / timm:<name>
    weights: str | None = None  # local weights file or snapshot folder for the encoder
    weights_map: str | None = None  # YAML {encoder name: local weights path}; default $PATHCHAT_ENCODER_WEIGHTS
    pretrained: bool = True  # False builds the encoder with random weights (tests, dry runs)
    tile: TileJobConfig = field(default_factory=TileJobConfig)
    extra_magnification: float | None = None  # a second, coarser magnification stored beside the first
    feature_dtype: str = "float32"  # "float32" or "float16" on disk
    encoder_identity: str = ""  # cheap identity of the weights (path, size, mtime), filled by `resolve`

    def __post_init__(self) -> None:
        check_positive("--extra-mag", self.extra_magnification)
        if self.feature_dtype not in ("float32", "float16"):
            raise ValueError(f"--feature-dtype must be float32 or float16, got {self.feature_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tile": self.tile.to_dict()}  # the tile config's own resume-key form

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtractJobConfig:
        return cls(**{**d, "tile": TileJobConfig.from_dict(d["tile"])})


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run, not what to compute: never part of the resume key."""

    batch_size: int = 64
    loader_workers: int = 2  # tile-decoding processes per extraction worker
    device: str = "auto"  # "auto" = cuda:LOCAL_RANK when CUDA is available, else cpu
    dtype: str = "auto"  # GPU compute precision: "auto" (the encoder's recommended), "fp32", "fp16", "bf16"

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be an integer >= 1, got {self.batch_size!r}")
        if isinstance(self.loader_workers, bool) or not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise ValueError(f"--workers must be an integer >= 0 (tile-decoding processes), got {self.loader_workers!r}")
        if self.dtype not in ("auto", *PRECISIONS):
            raise ValueError(f"--dtype must be one of auto, {', '.join(PRECISIONS)}, got {self.dtype!r}")


def _file_identity(path: str | None) -> str:
    if not path:
        return ""
    p = Path(path)
    if not p.exists():
        return f"{p}:missing"
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def resolve(cfg: ExtractJobConfig) -> ExtractJobConfig:
    """Fill in the cheap identity of the encoder's weights, so changed weights redo the slides.

    Raises:
        EncoderNotFoundError: unknown encoder name (a usage error).
    """
    spec = get_encoder_spec(cfg.encoder, weights=cfg.weights)
    weights_map = load_weights_map(cfg.weights_map)
    identity = "|".join([spec.name, str(spec.hub_id), str(cfg.pretrained), _file_identity(cfg.weights),
                         _file_identity(weights_map.get(spec.name))])
    return replace(cfg, encoder_identity=identity)


def _device(option: str) -> torch.device:
    if option != "auto":
        return torch.device(option)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass
class _WorkerState:
    encoder: LoadedEncoder
    runtime: RuntimeOptions


def setup_worker(params: dict[str, Any]) -> _WorkerState:
    """Runs once per worker process: load the encoder there."""
    cfg = ExtractJobConfig.from_dict(params["config"])
    runtime = RuntimeOptions(**params["runtime"])
    device = _device(runtime.device)
    if device.type == "cpu":  # leave cores to the decoding processes so both sides keep busy
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - max(1, runtime.loader_workers)))
    weights_map = load_weights_map(cfg.weights_map)
    encoder = load_encoder(cfg.encoder, device=device, weights=cfg.weights, weights_map=weights_map,
                           pretrained=cfg.pretrained)
    if runtime.dtype != "auto" and device.type == "cuda":
        encoder.dtype = PRECISIONS[runtime.dtype]  # an explicit choice overrides the recommendation
    return _WorkerState(encoder, runtime)


def _coords_for(source: SlideSource, job_dir: Path, tile_cfg: TileJobConfig,
                fingerprint: str) -> tuple[Path, TileCoords]:
    """The slide's coordinates file and contents at these settings, tiling it first when missing or stale.

    A coords file of an older job (`patches/<slide>.h5`) is used as it is when it matches.
    """
    found = find_coords_file(job_dir, source.slide_id, tile_cfg.tiling)
    key = params_key("tile", tile_cfg.to_dict())
    if found is not None:
        tile_coords = read_coords_h5(found)
        if tile_coords.attrs.get("fingerprint") == fingerprint and tile_coords.attrs.get("tiling_key") == key:
            return found, tile_coords
    tile_one(source, job_dir, tile_cfg.to_dict())
    path = output_paths(job_dir, source.slide_id, tile_cfg.tiling)["coords"]
    return path, read_coords_h5(path)


def encode_slide(source: SlideSource, tile_coords: TileCoords, encoder: LoadedEncoder,
                 runtime: RuntimeOptions, on_tiles: Callable[[int, int], None] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, list[TileFailure]]:
    """Features of every readable tile listed in a coords file (as read by `read_coords_h5`).

    `on_tiles(done, total)` is called after each batch (progress bars of interactive callers).

    Returns:
        (features float32 `[n, d]`, coords int64 `[n, 2]`, failed tiles).
    """
    attrs = tile_coords.attrs
    # Files from before `edge_pixels` existed were read with white edges.
    dataset = TileDataset(source.path, tile_coords.l0_coords, int(attrs["read_level"]), int(attrs["read_px"]),
                          int(attrs["patch_size"]), edge_pixels=str(attrs.get("edge_pixels", "white")))
    features, coords, failed = [], [], []
    on_gpu = encoder.device.type == "cuda"
    # On a GPU, uint8 tiles travel (3x smaller than float) and are preprocessed there; on a CPU the
    # loader's workers preprocess, leaving this process only the model.
    transform = None if on_gpu or runtime.loader_workers == 0 else encoder.spec.preprocessing
    loader = tile_loader(dataset, batch_size=runtime.batch_size, workers=runtime.loader_workers,
                         pin_memory=on_gpu, transform=transform)
    total, done = len(tile_coords.l0_coords), 0
    try:
        for batch in loader:
            done += len(batch.tiles) + len(batch.failed)
            if on_tiles is not None:
                on_tiles(done, total)
            failed.extend(batch.failed)
            if len(batch.tiles):
                if batch.inputs is not None:
                    features.append(encoder.encode_preprocessed(batch.inputs))
                else:
                    features.append(encoder.encode(batch.tiles.to(encoder.device, non_blocking=True)))
                coords.append(batch.l0_coords)
    finally:
        dataset.close()  # the handle this process opened (loader workers close theirs when they exit)
    dim = encoder.spec.dim
    feats = torch.cat(features).numpy() if features else np.zeros((0, dim), np.float32)
    xy = torch.cat(coords).numpy() if coords else np.zeros((0, 2), np.int64)
    return feats, xy, failed


def extract_one(source: SlideSource, job_dir: Path, params: dict[str, Any], state: _WorkerState) -> dict[str, Any]:
    """Tile (if needed) and encode one slide at each requested magnification. Runs in a worker."""
    return extract_slide(source, job_dir, ExtractJobConfig.from_dict(params["config"]), state.encoder,
                         state.runtime)


def extract_slide(source: SlideSource, job_dir: Path, cfg: ExtractJobConfig, encoder: LoadedEncoder,
                  runtime: RuntimeOptions, on_progress: Callable[[str, int, int], None] | None = None,
                  ) -> dict[str, Any]:
    """Tile (if needed) and encode one slide in this process; the batch worker and the inference
    pipeline both call this, so a slide's features are the same whoever made them.

    Args:
        on_progress: `(stage, done, total)` with stage "tiling" (0 / 1, then 1 / 1) or "encoding"
            (tiles done / tiles).
    Returns:
        {"state": "done" or "no_tissue", "outputs": [coords and features files], "info": {...}} as the
        batch runner records it.
    """
    fingerprint = fingerprint_slide(source)
    state = _WorkerState(encoder, runtime)
    outputs: list[str] = []
    info: dict[str, Any] = {"encoder": encoder.spec.name, "dim": encoder.spec.dim}
    magnifications = [None] + ([cfg.extra_magnification] if cfg.extra_magnification else [])
    for mag in magnifications:
        tiling = cfg.tile.tiling if mag is None else replace(cfg.tile.tiling, magnification=mag, mpp=None)
        tile_cfg = replace(cfg.tile, tiling=tiling)
        if on_progress is not None:
            on_progress("tiling", 0, 1)
        coords_file, tile_coords = _coords_for(source, job_dir, tile_cfg, fingerprint)
        if on_progress is not None:
            on_progress("tiling", 1, 1)
        encode_progress = None if on_progress is None else (lambda d, t: on_progress("encoding", d, t))
        feats, xy, failed = encode_slide(source, tile_coords, encoder, state.runtime, encode_progress)
        tile_attrs = tile_coords.attrs
        bag = FeatureBag(
            features=feats, coords=xy, slide_id=source.slide_id, encoder=encoder.spec.name,
            mpp=float(tile_attrs["mpp"]), patch_size_level0=int(tile_attrs["patch_size_level0"]),
            magnification=float(tile_attrs["target_magnification"]), source_format="pathchat", attrs={},
        )
        out = features_path(job_dir, tiling.folder_name, encoder.spec.name, source.slide_id)
        extra = {k: v for k, v in tile_attrs.items() if isinstance(v, (int, float, str))}
        extra.update({"slide_fingerprint": fingerprint, "encoder_fingerprint": encoder.fingerprint,
                      "failed_tiles": len(failed)})
        failed_coords = np.array([[f.l0_x, f.l0_y] for f in failed], dtype=np.int64).reshape(-1, 2)
        write_features_h5(out, bag, attrs=extra, dtype=np.float16 if cfg.feature_dtype == "float16" else np.float32,
                          failed_coords=failed_coords)
        outputs += [str(coords_file), str(out)]
        key = "features" if mag is None else f"features_{mag:g}x"
        info[key] = {"n_tiles": int(len(feats)), "failed_tiles": [f.to_dict() for f in failed[:50]],
                     "n_failed_tiles": len(failed), "magnification": bag.magnification,
                     "n_grid_tiles": int(len(tile_coords.l0_coords))}
    # No tile with tissue at the main magnification: an empty features file, and the `no_tissue` outcome
    outcome = "no_tissue" if info["features"]["n_grid_tiles"] == 0 else "done"
    return {"state": outcome, "outputs": outputs, "info": info}


def extract_slides(
    slides: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    config: ExtractJobConfig | None = None,
    runtime: RuntimeOptions | None = None,
    workers: int = 1,
    timeout_s: float = 3600.0,
    progress: bool = True,
) -> BatchSummary:
    """Extract tile features of every slide under `slides` into the job `out`.

    Tiles first where coordinates are missing. Resumable: a rerun skips slides whose features
    still match the slide, the encoder and the settings. Several processes (`torchrun`,
    `accelerate launch`, or plain copies of this command) may share one job: each slide is done once.

    Args:
        slides: slide files, DICOM series folders, or folders to search.
        out: job folder.
        config: encoder, tiling and storage settings.
        runtime: batch size, decoding processes, device.
        workers: extraction worker processes in this process (each loads the encoder once).
        timeout_s: a slide still running after this many seconds is killed and recorded as failed.
    Returns:
        The done / no_tissue / skipped / failed counts, the failure rows and the files passed over.
    Raises:
        ValueError: a bad value, `out` an existing file, or no slide at all under `slides`.
        EncoderNotFoundError: unknown encoder.
        BatchSetupError: the encoder could not be loaded (e.g. gated weights offline).
    """
    check_out_folder(out)
    check_positive("--timeout", timeout_s, allow_none=False, unit=" of seconds")
    cfg = resolve(config or ExtractJobConfig())
    run = runtime or RuntimeOptions()
    found = find_slides_or_fail(list(slides))
    params = {"config": cfg.to_dict()}
    runner = BatchRunner(out, "extract", extract_one, params, workers=workers, timeout_s=timeout_s,
                         setup=setup_worker, slides_per_worker=None, progress=progress,
                         runtime_params={"runtime": asdict(run)}, expected_errors=(SlideError,))
    summary = runner.run(found.sources)
    summary.ignored = found.ignored
    return summary
