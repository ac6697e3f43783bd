"""Generation benchmark: PathChat decode speed vs the bare language model, and turn prefill cost.

Run with `python bench/bench_generation.py`. One random-weight Qwen2-style LM built from a config
(default 6 layers, hidden 384, vocab 8192, fp32 CPU, 2 threads) inside PathChat with the default
connector, a slide of 1,000 random 512-d tiles and the offline test tokenizer. Greedy decoding of
a fixed number of new tokens with no end-of-turn stopping, compared three ways on the same prompt:

- `plain`: `language_model.generate(inputs_embeds=...)` on the prompt embeddings with the slide
  tokens already scattered in (the connector is not timed);
- `pathchat_generate`: `model.generate(input_ids, tile_features=...)` (connector on prefill only);
- `chat_session`: `ChatSession.ask` (its own KV-cached loop).

Decode tokens/s = (N - 1) / (t(N new tokens) - t(1 new token)) per repeat, so prefill and the
connector cancel out. Repeats are interleaved; ratios to `plain` are paired per repeat (median)
and best-vs-best ((min t_N - min t_1) / (N - 1), the least noisy since load only adds time), on
the wall clock and on process CPU time (steadier when other jobs share the CPU). Time to first
token (TTFT) of a ChatSession's first turn (system + slide tokens + question) vs a follow-up
turn, with how many tokens each prefilled, and a from-scratch prefill of the whole follow-up
conversation for contrast. The default `--repeats` is 7; the figures in the closing note used 9.
Prints one JSON object and writes bench/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from pathchat.inference.engine import ChatSession
from pathchat.model.conversation import render_conversation
from pathchat.model.modeling import PathChatForConditionalGeneration, build_pathchat
from pathchat.model.tokenizers import build_test_tokenizer
from pathchat.utils.atomic import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "Describe the tissue and grade the tumour, if there is one."
FOLLOW_UP = "Is there lymphovascular invasion?"


def build(layers: int, hidden: int, vocab: int, feature_dim: int) -> tuple[PathChatForConditionalGeneration, Any]:
    """A random Qwen2-style PathChat (eval mode, seed 0) and its tokenizer."""
    tokenizer = build_test_tokenizer("qwen2")
    heads = max(1, hidden // 64)
    text_config = {
        "model_type": "qwen2", "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 3 or 1),
        "intermediate_size": hidden * 8 // 3, "vocab_size": max(vocab, len(tokenizer) + 2),
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    model = build_pathchat(text_config, tokenizer, feature_dim, attn_implementation="sdpa")
    return model.eval(), tokenizer


def _time_ms(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call; CPU time is far steadier on a shared machine."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return 1000 * (time.perf_counter() - w0), 1000 * (time.process_time() - c0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--feature-dim", type=int, default=512)
    parser.add_argument("--tiles", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "generation.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer = build(args.layers, args.hidden, args.vocab, args.feature_dim)
    lm = model.language_model
    g = torch.Generator().manual_seed(0)
    tiles = {"tile_features": torch.randn(1, args.tiles, args.feature_dim, generator=g),
             "tile_coords": torch.rand(1, args.tiles, 2, generator=g) * 20_000.0}
    k = int(model.config.num_slide_tokens or 0)
    prompt = render_conversation([{"role": "user", "content": f"<slide>\n{QUESTION}"}], tokenizer, k,
                                 add_generation_prompt=True).input_ids
    input_ids = torch.tensor([prompt])
    attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        slide = model.connector(tiles["tile_features"], tiles["tile_coords"], None).tokens
        embeds = model.get_input_embeddings()(input_ids)
        mask = (input_ids == model.config.slide_placeholder_id).unsqueeze(-1)
        prompt_embeds = embeds.masked_scatter(mask, slide.to(embeds.dtype))

    def config(n: int) -> GenerationConfig:
        # Identical settings for both generate() calls: greedy, exactly n tokens (no eos).
        return GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None,
                                pad_token_id=tokenizer.pad_token_id,
                                suppress_tokens=model.generation_config.suppress_tokens)

    def plain(n: int) -> torch.Tensor:
        return lm.generate(inputs_embeds=prompt_embeds, attention_mask=attention_mask, generation_config=config(n))

    def pathchat(n: int) -> torch.Tensor:
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config(n),
                              **tiles)[:, input_ids.shape[1]:]

    def session(n: int) -> ChatSession:
        # The whole prompt prefilled, as plain `generate` does (bench_default_model measures the shared prefix).
        s = ChatSession(model, tokenizer, tiles["tile_features"][0], tiles["tile_coords"][0], max_new_tokens=n,
                        share_prefix=False)
        s.stop_ids = set()  # exactly n tokens, like the generate() calls
        s.ask(QUESTION)
        return s

    n = args.new_tokens
    with torch.inference_mode():
        same_plain, same_pathchat = plain(n), pathchat(n)
        s = session(n)
        outputs_equal = bool(torch.equal(same_plain, same_pathchat)) and s.answer_ids[0] == same_plain[0].tolist()
        clocks = ("wall", "cpu")
        runs = {clock: {name: {1: [], n: []} for name in ("plain", "pathchat_generate", "chat_session")}
                for clock in clocks}
        fns: dict[str, Callable[[int], Any]] = {"plain": plain, "pathchat_generate": pathchat, "chat_session": session}
        for _ in range(args.repeats):  # interleaved, so load changes hit all three alike
            for name, fn in fns.items():
                for m in (1, n):
                    for clock, value in zip(clocks, _time_ms(lambda fn=fn, m=m: fn(m)), strict=True):
                        runs[clock][name][m].append(value)

        # Time to first token: first turn vs follow-up, each ask() generating one token.
        ttft: dict[str, list[float]] = {"first_turn_ms": [], "follow_up_ms": [], "follow_up_full_prefill_ms": []}
        prefill: dict[str, int] = {}
        for _ in range(args.repeats):
            s = ChatSession(model, tokenizer, tiles["tile_features"][0], tiles["tile_coords"][0], share_prefix=False)
            ttft["first_turn_ms"].append(_time_ms(lambda s=s: s.ask(QUESTION, max_new_tokens=1))[0])
            ttft["follow_up_ms"].append(_time_ms(lambda s=s: s.ask(FOLLOW_UP, max_new_tokens=1))[0])
            full = torch.tensor([s.render(s.messages[:3])])
            ttft["follow_up_full_prefill_ms"].append(
                _time_ms(lambda full=full: model(input_ids=full, logits_to_keep=1, **tiles))[0])
            prefill = {"first_turn_prefill_tokens": s.prefill_lengths[0],
                       "follow_up_prefill_tokens": s.prefill_lengths[1],
                       "follow_up_conversation_tokens": int(full.shape[1]),
                       "full_recomputes": s.full_recomputes, "connector_runs": s.connector_runs}

    # Per repeat, decode ms/token = (t_N - t_1) / (N - 1); ratios are paired within a repeat (same
    # load), then the median is taken, so background load moves both sides of a ratio alike.
    decode: dict[str, Any] = {}
    for clock in clocks:
        per_token = {name: [(tn - t1) / (n - 1) for t1, tn in zip(r[1], r[n], strict=True)]
                     for name, r in runs[clock].items()}
        best = {name: (min(r[n]) - min(r[1])) / (n - 1) for name, r in runs[clock].items()}
        table: dict[str, Any] = {}
        for name, r in runs[clock].items():
            ms = statistics.median(per_token[name])
            table[name] = {"ms_1_token": round(statistics.median(r[1]), 2),
                           f"ms_{n}_tokens": round(statistics.median(r[n]), 2),
                           "ms_per_decode_token": round(ms, 3), "decode_tokens_per_s": round(1000 / ms, 1),
                           "best_ms_per_decode_token": round(best[name], 3)}
            if name != "plain":
                ratios = [p / q for p, q in zip(per_token["plain"], per_token[name], strict=True)]
                table[name]["ratio_vs_plain"] = round(statistics.median(ratios), 3)
                # Load only ever adds time, so best-vs-best is the least noisy estimate.
                table[name]["ratio_vs_plain_best"] = round(best["plain"] / best[name], 3)
                table[name]["ratio_vs_plain_per_repeat"] = [round(x, 3) for x in ratios]
        decode[clock] = table
    result = {
        "model": {"layers": args.layers, "hidden": args.hidden, "vocab": lm.config.vocab_size,
                  "parameters_lm": sum(p.numel() for p in lm.parameters()),
                  "attn_implementation": lm.config._attn_implementation, "dtype": "float32"},
        "connector": model.config.connector, "num_slide_tokens": k, "tiles": args.tiles,
        "prompt_tokens": len(prompt), "new_tokens": n, "repeats": args.repeats, "threads": args.threads,
        "greedy_outputs_identical": outputs_equal,
        "decode": decode,
        "ttft": {**{key: round(statistics.median(v), 2) for key, v in ttft.items()}, **prefill},
        "timing": ("medians of interleaved repeats; decode rate = (N-1)/(t_N - t_1); ratios paired per "
                   "repeat; 'wall' = perf_counter, 'cpu' = process_time (steadier under shared load)"),
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
