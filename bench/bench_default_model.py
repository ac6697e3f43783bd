"""Speed of the built-in model's streamed answers against base SmolLM2's plain `generate`.

Run with `python bench/bench_default_model.py` (part of `make bench`). The built-in model
(SmolLM2-135M-Instruct + shipped connector and LoRA adapter, fp32 CPU, 2 threads by default) answers
one question about a slide through `ChatSession.ask(stream=True)`, as `pathchat chat` does; base
SmolLM2 answers the same conversation text (same system prompt, no slide tokens) through
`model.generate`. The two sides alternate, one answer each per repeat, and each figure is the median
over `--repeats` (on this shared 2-core VM a best-of-3 swung the TTFT ratio between 0.64 and 0.83 on
one model; load only adds time):

- time to first token (TTFT): the session's first streamed piece; `generate(max_new_tokens=1)`.
  A session copies the keys and values of the text before the slide (system prompt, user header),
  computed once when the model is loaded (`engine.prime_prefix`, as `Pipeline.from_pretrained`
  does), and prefills only the slide tokens and the question; `builtin_without_shared_prefix` is a
  session that prefills its whole prompt;
- decode tokens/s: (n - 1) / (time of the last token - time of the first), n the tokens generated
  (the session stops at its end-of-turn; `generate` is held to `--new-tokens`).

The issue's target is a ratio >= 0.9 for both (TTFT as base / built-in). The slide is random
features on a 4 x 4 grid: speed does not depend on what the tiles show. Prints one JSON object and
writes bench/results/default_model.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "Describe this slide."


def _slide(feature_dim: int, side: int = 4, tile_um: float = 256.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], dim=1).float() * tile_um
    return {"tile_features": torch.randn(side * side, feature_dim, generator=g), "tile_coords": coords,
            "slide_size_um": torch.tensor([side * tile_um, side * tile_um])}


def session_answer(model: Any, tokenizer: Any, slide: dict[str, torch.Tensor], max_new_tokens: int,
                   share_prefix: bool = True) -> dict[str, Any]:
    """One streamed answer in a new session: TTFT, decode tokens/s, token counts."""
    from pathchat.inference.engine import ChatSession

    session = ChatSession(model, tokenizer, slide["tile_features"], slide["tile_coords"],
                          slide_size_um=slide["slide_size_um"], max_new_tokens=max_new_tokens,
                          share_prefix=share_prefix)
    start = time.perf_counter()
    first = last = None
    for _piece in session.ask(QUESTION, stream=True):
        last = time.perf_counter()
        first = first or last
    assert first is not None and last is not None
    n = len(session.answer_ids[-1])
    return {"ttft_s": first - start, "tokens_per_s": (n - 1) / (last - first) if n > 1 and last > first else None,
            "new_tokens": n, "prompt_tokens": session.prefill_lengths[0] + session.shared_prefix_tokens,
            "prefilled_tokens": session.prefill_lengths[0]}


def base_answer(lm: Any, ids: dict[str, torch.Tensor], new_tokens: int) -> dict[str, Any]:
    """One plain `generate`: TTFT from a 1-token call, decode tokens/s from a `new_tokens` one."""
    with torch.no_grad():
        t = time.perf_counter()
        lm.generate(**ids, max_new_tokens=1, do_sample=False)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        lm.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        tn = time.perf_counter() - t
    prompt = int(ids["input_ids"].shape[1])
    return {"ttft_s": t1, "tokens_per_s": (new_tokens - 1) / max(tn - t1, 1e-9), "new_tokens": new_tokens,
            "prompt_tokens": prompt, "prefilled_tokens": prompt}


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["tokens_per_s"] for r in runs if r["tokens_per_s"] is not None]
    return {"ttft_s": statistics.median(r["ttft_s"] for r in runs),
            "tokens_per_s": statistics.median(rates) if rates else 0.0,
            "new_tokens": runs[-1]["new_tokens"], "prompt_tokens": runs[-1]["prompt_tokens"],
            "prefilled_tokens": runs[-1]["prefilled_tokens"], "repeats": len(runs)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens base SmolLM2 generates; the session's cap")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pathchat.model.builtin import builtin_model_dir
    from pathchat.model.pretrained import load_pathchat
    from pathchat.model.smollm import load_smollm2

    folder = Path(args.model) if args.model else builtin_model_dir()
    if folder is None:
        raise SystemExit("no built-in model is installed (pathchat/assets/default_model/); pass --model")
    model, tokenizer = load_pathchat(folder, device="cpu", merge_adapter=True)
    lm, base_tokenizer = load_smollm2()
    system_prompt = json.loads((folder / "config.json").read_text()).get("system_prompt") or ""
    if not system_prompt:  # the shipped chat template carries it as the default: read it back
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        system_prompt = rendered.split("<|im_start|>system\n", 1)[-1].split("<|im_end|>", 1)[0]
    from pathchat.inference.engine import prime_prefix

    prime_prefix(model, tokenizer)  # as Pipeline.from_pretrained does
    slide = _slide(int(model.config.feature_dim))
    ids = base_tokenizer.apply_chat_template([{"role": "system", "content": system_prompt},
                                              {"role": "user", "content": QUESTION}],
                                             add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # A session without the shared prefix and one with it alternate with base SmolLM2, so all three see
    # the same machine.
    cold_runs, session_runs, base_runs = [], [], []
    for _ in range(args.repeats):
        cold_runs.append(session_answer(model, tokenizer, slide, args.new_tokens, share_prefix=False))
        session_runs.append(session_answer(model, tokenizer, slide, args.new_tokens))
        base_runs.append(base_answer(lm, ids, args.new_tokens))
    session, cold, base = medians(session_runs), medians(cold_runs), medians(base_runs)
    result = {
        "model": str(folder), "threads": args.threads, "question": QUESTION,
        "builtin_chat_session": session, "builtin_without_shared_prefix": cold, "base_smollm2_generate": base,
        "tokens_per_s_ratio": round(session["tokens_per_s"] / max(base["tokens_per_s"], 1e-9), 3),
        "ttft_ratio_base_over_builtin": round(base["ttft_s"] / max(session["ttft_s"], 1e-9), 3),
        "ttft_ratio_base_over_without_shared_prefix": round(base["ttft_s"] / max(cold["ttft_s"], 1e-9), 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_model.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
