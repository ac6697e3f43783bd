"""Connector benchmark: wall time and peak memory of one slide through a connector, by tile count.

Run with `python bench/bench_connector.py` (defaults: the default `scale_invariant` connector,
d_enc = 512, d_llm = 576 (SmolLM2-135M's width), batch 1, fp32 CPU, 2 threads, inference_mode,
1k / 10k / 50k tiles). Time: median of 5 calls after 2 untimed warm-ups, in this process.
Memory, per size in a fresh subprocess: how far the process's RSS peaks above its level just
before one forward pass (Linux: VmHWM reset through /proc/self/clear_refs), after building the
model and the inputs; plus the analytic size of the largest intermediates (the `[b, n, hidden]`
tile memory, every layer's grouped keys and values, the chunked `[b, heads, k, n]`
attention weights). RSS counts only pages the allocator takes from the OS, so memory it reuses
from earlier frees is missed: a lower bound on what the forward pass touches.
Prints one JSON object and writes bench/results/connector.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pathchat.model.connectors import CONNECTORS, DEFAULT_CONNECTOR, ConnectorConfig, build_connector
from pathchat.utils.atomic import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def make_inputs(n: int, feature_dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features `[1, n, d_enc]` and µm coords `[1, n, 2]` on a square grid of 128 µm tiles."""
    g = torch.Generator().manual_seed(seed)
    side = int(n**0.5) + 1
    idx = torch.arange(n)
    coords = torch.stack([idx % side, idx // side], dim=1).float() * 128.0
    return torch.randn(1, n, feature_dim, generator=g), coords[None]


def build(config: ConnectorConfig, feature_dim: int, llm_dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_connector(config, feature_dim, llm_dim).eval()


def time_forward(model: torch.nn.Module, n: int, feature_dim: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median and min wall time (ms) of a forward pass on n tiles."""
    feats, coords = make_inputs(n, feature_dim)
    with torch.inference_mode():
        for _ in range(warmup):
            model(feats, coords, None)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(feats, coords, None)
            times.append(time.perf_counter() - t0)
    return {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times)}


def _status_kib(field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(config: ConnectorConfig, n: int, feature_dim: int, llm_dim: int) -> dict[str, Any]:
    """In a fresh process: how far RSS peaks above its level before one forward pass (MiB).

    On Linux the peak (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so the rise is
    measured from the current RSS; elsewhere `ru_maxrss` is used, which misses peaks below the
    setup's own high-water mark.
    """
    model = build(config, feature_dim, llm_dim)
    feats, coords = make_inputs(n, feature_dim)
    with torch.inference_mode():
        model(*make_inputs(16, feature_dim), None)  # load lazily initialised kernels first
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM - VmRSS (Linux, peak reset before the call)"
        before = _status_kib("VmRSS")
    except OSError:
        method = "ru_maxrss rise (peak not resettable: lower bound)"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        model(feats, coords, None)
    after = _status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_peak_rise_mib": (after - before) / 1024, "rss_method": method,
            "inputs_mib": feats.numel() * 4 / 2**20}


def analytic_mib(config: ConnectorConfig, n: int) -> dict[str, float]:
    """Sizes (MiB, fp32, b = 1) of the largest per-tile intermediates, from the config."""
    hidden = getattr(config, "hidden_dim", None)
    heads = getattr(config, "num_heads", None)
    if hidden is None or heads is None:
        return {}
    from pathchat.model.connectors.attention import _WEIGHTS_CHUNK_ELEMENTS

    k = config.num_tokens  # type: ignore[attr-defined]
    kv_heads = getattr(config, "num_kv_heads", heads)
    layers = getattr(config, "num_layers", 1)
    rows = k * heads // kv_heads  # grouped queries: each key/value head serves heads / kv_heads query heads
    heads_per_chunk = max(1, min(kv_heads, _WEIGHTS_CHUNK_ELEMENTS // (rows * n)))
    return {
        "tile_memory_mib": n * hidden * 4 / 2**20,
        "tile_kv_mib": n * 2 * kv_heads * (hidden // heads) * layers * 4 / 2**20,
        "attention_weights_chunk_mib": heads_per_chunk * rows * n * 4 / 2**20,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connector", default=DEFAULT_CONNECTOR, choices=sorted(CONNECTORS),
                        help="registered connector, with its default config")
    parser.add_argument("--config-json", default=None, help="a full connector config as JSON (overrides --connector)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000], help="tile counts")
    parser.add_argument("--feature-dim", type=int, default=512, help="d_enc")
    parser.add_argument("--llm-dim", type=int, default=576, help="d_llm (576 = SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "connector.json")
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    config_dict = json.loads(args.config_json) if args.config_json else {"type": args.connector}
    config = ConnectorConfig.from_dict(config_dict)
    if args.memory_probe is not None:  # child mode: one size, one JSON line
        print(json.dumps(memory_probe(config, args.memory_probe, args.feature_dim, args.llm_dim)))
        return {}

    model = build(config, args.feature_dim, args.llm_dim)
    rows = []
    for n in args.sizes:
        row: dict[str, Any] = {"tiles": n}
        row.update(time_forward(model, n, args.feature_dim, args.repeats, args.warmup))
        probe = subprocess.run(
            [sys.executable, __file__, "--memory-probe", str(n), "--config-json", json.dumps(config.to_dict()),
             "--feature-dim", str(args.feature_dim), "--llm-dim", str(args.llm_dim),
             "--threads", str(args.threads)],
            check=True, capture_output=True, text=True,
        )
        row.update(json.loads(probe.stdout.strip().splitlines()[-1]))
        row.update(analytic_mib(config, n))
        rows.append(row)
    result = {
        "connector": config.to_dict(),
        "num_tokens": model.num_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "feature_dim": args.feature_dim,
        "llm_dim": args.llm_dim,
        "batch": 1,
        "dtype": "float32",
        "threads": args.threads,
        "timing": f"median of {args.repeats} after {args.warmup} warm-up calls, torch.inference_mode",
        "memory": "RSS peak rise over one forward in a fresh subprocess (lower bound) + analytic sizes",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "results": rows,
    }
    print(json.dumps(result, indent=2))
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
