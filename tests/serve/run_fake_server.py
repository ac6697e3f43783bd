"""Run the app with `FakePipeline` in its own process (load test: the server's memory is its own).

    python tests/serve/run_fake_server.py --root DIR --port N [--concurrency 2] [--busy-wait 0.5] [--delay 0.05]

Adds one route, /_test/stats, with the fake pipeline's counters (model calls, most answers at once).
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from fake_pipeline import FakePipeline
    from serve_helpers import make_slide_folder

    from pathchat.serve.app import build_app
    from pathchat.serve.server import run_app
    from pathchat.serve.settings import ServeSettings

    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--busy-wait", type=float, default=0.5)
    p.add_argument("--delay", type=float, default=0.05)
    args = p.parse_args()
    root = Path(args.root)
    slides, _ = make_slide_folder(root)
    pipe = FakePipeline(delay_s=args.delay)
    settings = ServeSettings(data_dir=root / "data", port=args.port, concurrency=args.concurrency,
                             busy_wait_s=args.busy_wait)
    app = build_app(settings, pipe, slides)

    @app.get("/_test/stats")
    def stats() -> dict:
        with open("/proc/self/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return {"model_calls": pipe.model_calls, "max_active": pipe.max_active, "rss_mb": rss_kb / 1024,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    app.router.routes.insert(0, app.router.routes.pop())  # before the Gradio mount at "/"
    run_app(app, "127.0.0.1", args.port, log_level="error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
