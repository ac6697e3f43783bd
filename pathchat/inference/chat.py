"""`pathchat chat`: a streamed terminal conversation about one slide, or scripted questions.

Interactive: the research-use notice, a progress bar while a new slide is tiled and encoded, then a
prompt; answers stream as they are generated and follow-ups reuse the KV cache. Commands start with
a slash (`/help` lists them). Scripted: `--ask` (repeatable) answers each question in turn in one
session and exits; `--json` prints one JSON object instead of text. A slide with no usable tissue
gets the fixed "no tissue found" answer without a model call, and a slide scanned coarser than the
model's feature recipe (or recording no resolution) a fixed "resolution too low" answer.
"""

from __future__ import annotations

import json as jsonlib
import shlex
import sys
from pathlib import Path
from typing import Any, TextIO

from pathchat.inference.notices import RESEARCH_NOTICE

__all__ = ["HELP", "chat", "run_chat_loop"]

HELP = """commands:
  /report [DIR]        write this slide's report (Markdown, JSON, heatmap, evidence) into DIR (default: reports)
                       and print it
  /region X Y W H      ask about the tiles inside this level-0 rectangle only (a new conversation)
  /region off          back to the whole slide (a new conversation)
  /reset               forget the conversation (same slide)
  /save FILE           the conversation as JSON, with the model and its feature recipe
  /help                this text
  /quit                leave (also Ctrl-D)"""


class _Progress:
    """tqdm bars for the stages of preparing a slide (tiling, then encoding tiles)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            unit = "tiles" if stage == "encoding" else "slide"
            self.bar = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, leave=False)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _stream_answer(session: Any, question: str, out: TextIO) -> str:
    answer = ""
    out.write("pathchat> ")
    out.flush()
    for piece in session.ask(question, stream=True):
        answer += piece
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return answer


def _command(line: str, state: dict[str, Any], out: TextIO) -> bool:
    """Run one slash command; False means quit."""
    from pathchat.inference.pipeline import save_conversation

    pipe, slide = state["pipe"], state["slide"]
    try:
        parts = shlex.split(line)
    except ValueError as e:
        out.write(f"error: {e}\n")
        return True
    name, args = parts[0].lower(), parts[1:]
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/help":
        out.write(HELP + "\n")
    elif name == "/reset":
        state["session"].reset()
        out.write("conversation reset\n")
    elif name == "/save":
        if len(args) != 1:
            out.write("usage: /save FILE\n")
        else:
            path = save_conversation(state["session"], Path(args[0]).expanduser())
            out.write(f"saved {len(state['session'].messages) // 2} turns to {path}\n")
    elif name == "/region":
        if args == ["off"]:
            state["session"] = pipe.session(slide, max_new_tokens=state["max_new_tokens"])
            out.write("whole slide (new conversation)\n")
        elif len(args) != 4:
            out.write("usage: /region X Y W H   (level-0 pixels)   or   /region off\n")
        else:
            try:
                region = [float(a) for a in args]
                session = pipe.session(slide, region=region, max_new_tokens=state["max_new_tokens"])
            except ValueError as e:
                out.write(f"error: {e}\n")
                return True
            state["session"] = session
            out.write(f"region {tuple(int(v) for v in region)}: {len(session.tile_index)} tiles (new conversation)\n")
    elif name == "/report":
        from pathchat.inference.report import write_report

        folder = Path(args[0]).expanduser() if args else Path("reports")
        result = write_report(pipe, slide, folder)
        out.write(result["paths"]["markdown"].read_text())
        out.write(f"\nwritten: {', '.join(str(p) for p in result['paths'].values())}\n")
    else:
        out.write(f"unknown command {name}; /help lists them\n")
    out.flush()
    return True


def run_chat_loop(state: dict[str, Any], lines: TextIO, out: TextIO, interactive: bool) -> None:
    """Read questions and commands from `lines` until /quit or end of input."""
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = lines.readline()
        if not line:
            if interactive:
                out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(line, state, out):
                return
            continue
        try:
            _stream_answer(state["session"], line, out)
        except ValueError as e:  # e.g. the conversation outgrew the model's context
            out.write(f"\nerror: {e}\n")
        except KeyboardInterrupt:
            out.write("\n[stopped]\n")


def _check_inputs(slide: str, model: str | None, ask: list[str] | None, max_new_tokens: int, mag: float | None,
                  tile_size: int | None) -> None:
    """Refuse bad values in one line, before a model (or the built-in model's first conversion) loads.

    Raises:
        FileNotFoundError: the slide or the model folder does not exist.
        ValueError: naming the flag and the value.
    """
    import math

    if not Path(slide).exists():
        raise FileNotFoundError(f"{slide}: no such slide or features file")
    from pathchat.inference.builtin import BUILTIN_NAME

    if model is not None and model != BUILTIN_NAME and not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model}: no such checkpoint folder")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if mag is not None and not (math.isfinite(mag) and mag > 0):
        raise ValueError(f"--mag must be a positive number, got {mag}")
    if tile_size is not None and tile_size < 8:
        raise ValueError(f"--tile-size must be at least 8 px, got {tile_size}")
    for question in ask or []:
        if not question.strip():
            raise ValueError("--ask: a question is empty")


def chat(slide: str, model: str | None = None, ask: list[str] | None = None, json: bool = False,
         max_new_tokens: int = 256, features: str | None = None, encoder: str | None = None,
         mag: float | None = None, tile_size: int | None = None, device: str = "cpu",
         progress: bool = True) -> int:
    """Chat about one slide in the terminal: streamed answers, follow-ups reuse the KV cache.

    Type a question, or a command: /report [DIR], /region X Y W H, /region off, /reset, /save FILE,
    /help, /quit. For scripts, --ask (repeatable) answers each question in turn and exits; --json
    prints them as one JSON object. For Research Use Only. Not for use in diagnostic procedures.

    Args:
        slide: a slide file (SVS, NDPI, MRXS, TIFF, DICOM folder, ...) or its features .h5.
        model: checkpoint folder (default: the built-in model).
        ask: a question to answer without the interactive prompt (repeat the flag for several).
        json: with --ask, print one JSON object (questions, answers, top tiles, model, recipe).
        max_new_tokens: the longest answer, in tokens.
        features: feature cache (a `pathchat extract` job folder; default $PATHCHAT_CACHE/features).
        encoder: encoder of an old checkpoint that records no feature recipe.
        mag: magnification of an old checkpoint that records no feature recipe.
        tile_size: tile size (px) of an old checkpoint that records no feature recipe.
        device: where the model runs ("cpu", "cuda", "cuda:1").
        progress: show progress bars while a new slide is tiled and encoded.
    """
    from pathchat.inference.pipeline import Pipeline, SlideFeatures
    from pathchat.inference.recipe import SlideResolutionError

    out = sys.stdout
    if json and not ask:
        print("pathchat chat: error: --json needs at least one --ask QUESTION", file=sys.stderr)
        return 1
    _check_inputs(slide, model, ask, max_new_tokens, mag, tile_size)  # before any model loads
    if not ask:
        print(RESEARCH_NOTICE, file=out, flush=True)
    pipe = Pipeline.from_pretrained(model, device=device, feature_job=features, encoder=encoder,
                                    magnification=mag, tile_size=tile_size, max_new_tokens=max_new_tokens,
                                    progress=progress)
    bars = _Progress(progress)
    try:
        prepared = pipe.prepare(slide, progress=bars)
    except SlideResolutionError as e:  # readable, but not at the model's resolution: fixed answers
        prepared = SlideFeatures.unassessed(e, pipe.recipe)
    finally:
        bars.close()
    session = pipe.session(prepared, max_new_tokens=max_new_tokens)
    if ask:
        answers = []
        for question in ask:
            if json:
                text = session.ask(question)
            else:
                print(f"you> {question}", file=out)
                text = _stream_answer(session, question, out)
            answers.append({"question": question, "answer": text,
                            "top_tiles": session.top_tiles(5) if session.calls_model else []})
        if json:
            print(jsonlib.dumps({"slide": prepared.slide_id, "tiles": prepared.num_tiles,
                                 "no_tissue": prepared.no_tissue,
                                 "insufficient_resolution": prepared.insufficient_resolution,
                                 "model": pipe.model_id,
                                 "feature_recipe": pipe.recipe.to_dict(), "notice": RESEARCH_NOTICE,
                                 "answers": answers}, ensure_ascii=False), file=out)
        return 0
    where = ("resolution too low for this model: answers are fixed" if prepared.insufficient_resolution
             else "no tissue found: answers are fixed" if prepared.no_tissue else f"{prepared.num_tiles} tiles")
    print(f"slide {prepared.slide_id} ({where}); model {pipe.model_id}. /help lists the commands.", file=out)
    state = {"pipe": pipe, "slide": prepared, "session": session, "max_new_tokens": max_new_tokens}
    run_chat_loop(state, sys.stdin, out, interactive=sys.stdin.isatty())
    return 0
