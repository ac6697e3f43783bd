"""`pathchat serve`: the pathologist's web UI (slide viewer, streamed chat, evidence, region questions, reports).

Importable code of the UI lives here so an installed package serves; `serve/` in the repository holds
the npm manifest and lock file of the browser code (OpenSeadragon) and the entry script.
"""

from pathchat.serve.settings import ServeSettings, ServeSettingsError

__all__ = ["ServeSettings", "ServeSettingsError", "build_app", "serve"]


def __getattr__(name: str):  # gradio and torch load only when the app is built
    if name == "build_app":
        from pathchat.serve.app import build_app

        return build_app
    if name == "serve":
        from pathchat.serve.server import serve

        return serve
    raise AttributeError(name)
