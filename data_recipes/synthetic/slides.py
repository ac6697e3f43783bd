"""Writing the synthetic slides, several processes at once (rendering is CPU-bound numpy and JPEG).

Kept apart from the build so the writer processes import only the slide writer, not torch.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from pathchat.wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide


def _write(job: tuple[str, SyntheticSlideSpec]) -> str:
    path, spec = job
    write_synthetic_slide(path, spec)
    return path


def write_slides(jobs: Sequence[tuple[Path, SyntheticSlideSpec]], workers: int = 2, progress: bool = True) -> int:
    """Write every (path, spec) whose file does not exist yet; returns how many were written.

    Slides are deterministic in their spec and written atomically, so an existing file is the finished
    slide of an earlier, interrupted build.
    """
    todo = [(str(p), s) for p, s in jobs if not Path(p).is_file()]
    bar = tqdm(total=len(todo), desc="write slides", unit="slide", disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            _write(job)
            bar.update(1)
    else:
        with mp.get_context("forkserver").Pool(min(workers, len(todo))) as pool:
            for _ in pool.imap_unordered(_write, todo, chunksize=4):
                bar.update(1)
    bar.close()
    return len(todo)
