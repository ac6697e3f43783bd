"""Settings of `pathchat serve`, checked before anything listens.

The safety rules live here so that every entry point (CLI, Python, tests) gets them: the server binds
loopback unless authentication is configured, a share tunnel likewise needs authentication, and
uploads, caches and reports stay inside the app's own data folder.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServeSettings", "ServeSettingsError", "default_data_dir", "AUTH_FILE_ENV"]

#: Environment variable naming an auth file (same format as `--auth-file`).
AUTH_FILE_ENV = "PATHCHAT_AUTH_FILE"
#: Environment variable overriding the app's data folder.
DATA_DIR_ENV = "PATHCHAT_SERVE_DATA"


class ServeSettingsError(ValueError):
    """A setting that would make the server unsafe or unusable (the message names the flag)."""


def default_data_dir() -> Path:
    """``$PATHCHAT_SERVE_DATA``, else the cache's ``serve/`` folder (``$PATHCHAT_CACHE/serve``, ``~/.cache/pathchat/serve``)."""
    from pathchat.utils.cache import cache_dir

    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    return cache_dir("serve")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; any other name or address is reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeSettings:
    """Everything `pathchat serve` needs; every default works on a fresh clone.

    Attributes:
        model: checkpoint folder; None = the built-in model.
        slides: server-side slide folder; None = demo slides generated into `data_dir/demo_slides`.
        host / port: where to listen (loopback by default).
        auth_file: lines of `user:password`; None = `$PATHCHAT_AUTH_FILE` if set, else no auth.
        share: open a public share link (refused without auth).
        data_dir: uploads, reports, feature and Gradio caches.
        concurrency: questions answered at once; more wait up to `busy_wait_s`, then get the busy message.
        busy_wait_s: seconds a question waits for a free slot before the busy message.
        queue_size: requests Gradio keeps waiting beyond the running ones.
        max_upload_mb: upload size limit (MiB); 0 disables uploads.
        device: torch device of the model.
        max_new_tokens: cap of one answer.
        top_tiles: evidence tiles listed under an answer.
        osd_dir: OpenSeadragon's build folder; None = `serve/node_modules/openseadragon/build/openseadragon`.
    """

    model: str | None = None
    slides: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    auth_file: str | None = None
    share: bool = False
    data_dir: Path = field(default_factory=default_data_dir)
    concurrency: int = 2
    busy_wait_s: float = 20.0
    queue_size: int = 64
    max_upload_mb: int = 2048
    device: str = "cpu"
    max_new_tokens: int = 256
    top_tiles: int = 5
    osd_dir: str | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        if self.auth_file is None and os.environ.get(AUTH_FILE_ENV):
            self.auth_file = os.environ[AUTH_FILE_ENV]

    def check(self) -> None:
        """Refuse unsafe or impossible combinations.

        Raises:
            ServeSettingsError: naming the flag and what to do instead.
        """
        if not 0 < self.port < 65536:
            raise ServeSettingsError(f"--port {self.port}: must be in 1..65535")
        if self.concurrency < 1:
            raise ServeSettingsError(f"--concurrency {self.concurrency}: must be at least 1")
        if self.max_upload_mb < 0:
            raise ServeSettingsError(f"--max-upload-mb {self.max_upload_mb}: must be 0 (no uploads) or more")
        if not is_loopback(self.host) and not self.auth_file:
            raise ServeSettingsError(
                f"--host {self.host}: refusing to listen beyond this machine without authentication; "
                f"pass --auth-file FILE (or set {AUTH_FILE_ENV}), or keep the default 127.0.0.1")
        if self.share and not self.auth_file:
            raise ServeSettingsError(
                f"--share: refusing a public link without authentication; pass --auth-file FILE (or set {AUTH_FILE_ENV})")
        if self.slides is not None and not Path(self.slides).is_dir():
            raise ServeSettingsError(f"--slides {self.slides}: not a folder")
        if self.auth_file is not None and not Path(self.auth_file).is_file():
            raise ServeSettingsError(f"--auth-file {self.auth_file}: no such file")

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    @property
    def features_dir(self) -> Path:
        return self.data_dir / "features"

    @property
    def gradio_dir(self) -> Path:
        return self.data_dir / "gradio"

    @property
    def demo_slides_dir(self) -> Path:
        return self.data_dir / "demo_slides"
