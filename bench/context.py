"""How much of a long document's context a model must use: the teacher itself, limited to its last W tokens.

    python bench/context.py                      # windows 64 (+ 4 sinks), 256, 1024; ~4 min on 2 CPU cores
    python bench/context.py --windows 1024 2048 --documents 5

The long-range diagnostics of `linearize run` (and `linearize eval --long-range`) compare a student with
the teacher by position in held-out documents of 4096 tokens, and at 1024 and 4096 tokens of context. This
script gives the yardstick for those numbers: the same teacher with exact softmax attention, but each query
only seeing the last W keys (plus the first 4 tokens, the attention sinks a streaming model keeps), through
a 4D attention mask on the same documents the run uses (`data.long_context`, `data.long_documents`, the
same seed). Any model whose memory of the past reaches about W tokens should land near the W row; a row's
"@4096 / @1024" is what the run's "ratio at 4096 within 10% of the ratio at 1024" asks of it.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from linearize.data import build_blocks
from linearize.evaluate import POSITION_BUCKETS, bucket_ratios, position_profile
from linearize.teacher import load_teacher

SINKS = 4


def window_mask(length: int, window: int, sinks: int = SINKS) -> torch.Tensor:
    """[1, 1, L, L] bool, True = attend: the last `window` keys (the query included) and the first `sinks`."""
    i = torch.arange(length)
    causal = i[None, :] <= i[:, None]
    recent = i[:, None] - i[None, :] < window
    return (causal & (recent | (i[None, :] < sinks)))[None, None]


class Windowed(torch.nn.Module):
    """The model, every call attending through `window_mask` (what `position_profile` then scores)."""

    def __init__(self, model, window: int):
        super().__init__()
        self.model, self.window = model, window

    def forward(self, input_ids: torch.Tensor, **kwargs):
        mask = window_mask(input_ids.shape[1], self.window).to(input_ids.device)
        return self.model(input_ids=input_ids, attention_mask=mask, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--length", type=int, default=4096, help="document length (data.long_context)")
    parser.add_argument("--documents", type=int, default=3, help="documents per domain (data.long_documents)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model, tokenizer = load_teacher(args.model, dtype=torch.float32)
    data = build_blocks(tokenizer, "default", seq_len=1024, train_tokens=0, eval_tokens_per_domain=0,
                        seed=args.seed, long_tokens=args.length, long_documents_per_domain=args.documents)
    started = time.perf_counter()
    print(f"# teacher '{args.model}' limited to its last W keys + {SINKS} sinks ({platform.machine()}, "
          f"{torch.get_num_threads()} threads, float32)\n")
    print("documents: " + "; ".join(f"{d}: {', '.join(ids)}" for d, ids in data.long_documents.items()) + "\n")
    columns = [f"[{a}, {b})" for a, b in POSITION_BUCKETS] + ["ratio@1024", "ratio@4096"]
    header = ["teacher, keys seen"] + [f"{d} {c}" for d in data.long for c in columns + ["@4096 / @1024"]]
    print("| " + " | ".join(header) + " |")
    print("|---" + "|---:" * (len(header) - 1) + "|")
    full = {d: position_profile(model, docs, f"full ({d})") for d, docs in data.long.items()}
    for window in args.windows:
        cells = [f"last {window} + {SINKS} sinks"]
        for domain, docs in data.long.items():
            ratios = bucket_ratios(position_profile(Windowed(model, window), docs, f"last {window} ({domain})"),
                                    full[domain])
            cells += [f"{ratios[c]:.3f}" if c in ratios else "" for c in columns]
            growth = ratios.get("ratio@4096", math.nan) / ratios["ratio@1024"]
            cells.append(f"{growth:.3f}")
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s; ratio = perplexity of the limited teacher / the full "
          "teacher's, pooled over the documents of a domain")


if __name__ == "__main__":
    main()
