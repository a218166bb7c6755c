"""Why a linear state does not copy: the teacher's induction heads, probed one by one on the copy test.

    python bench/recall.py                                   # the default run's student, L = 256 (~1 min)
    python bench/recall.py --student runs/x --length 1024

On a random token sequence repeated once, the teacher copies with induction heads: a query in the second
copy attends to the key just after the earlier occurrence of its own token (the target, L - 1 back). This
script finds those heads (mean teacher attention on the target over the second copy >= --min-mass) and
measures, for each, what a constant-size state would have to carry:

- teacher: its attention mass on keys beyond the student's window and sinks ("far" keys), and on the target;
- the student's linear terms: their share of its attention mass (linear / (window + sinks + linear)) and
  the fraction of the linear mass that lands on the target;
- cosine to the teacher's far-key output (its attention renormalised over the far keys, times v) of the
  same head's v averaged over the far keys with these weights:
  uniform; the student's linear terms; exp(q.k / sqrt(d)) on the q and k the linear terms read (pre-RoPE
  unless the model says otherwise; exact: it needs every key, the cost the state avoids); "vq N": that
  kernel with each key replaced by the nearest of N codes fitted by k-means on the same head's keys over
  natural text (a state of N x (d + 1) per head, the size of the linear state at N = 256); "prf N": the
  kernel estimated with N positive random features (Performer; Choromanski et al. 2021); "delta": a
  delta-rule state (DeltaNet; Yang et al. 2024) written with the same L2-normalised keys as each leaves the
  window, S += (v - S k) k^T, read with the target's own key, the best query it could be given (its
  capacity, not what a trained query would reach). "key cosine": the mean cosine between two different
  keys of the sequence (what a delta-rule state must tell apart).

The teacher's attention is computed with the student's own q/k/v projections (stage-2 LoRA included): the
question is what the student's state misses of attention over the same vectors. Numbers are means over the
second copy of `--sequences` sequences.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from linearize import load
from linearize.data import build_blocks
from linearize.evaluate import copy_sequences
from linearize.layers.attention import MixerInput, attention_mode
from linearize.methods.hybrid import HybridMixer
from linearize.train.transfer import position_embeddings


@torch.no_grad()
def record(model, ids: torch.Tensor) -> dict[int, tuple]:
    """{layer index: (layer, MixerInput)} for one forward of `ids` [1, T]."""
    out = {}
    with attention_mode(model, "record") as layers:
        model(input_ids=ids, use_cache=False)
        for layer in layers:
            hidden = layer.recorded[0]
            q, k, v, q_nope, k_nope = layer.project(hidden, position_embeddings(model, hidden))
            out[layer.layer_idx] = (layer, MixerInput(q, k, v, q_nope, k_nope, hidden))
    return out


def kmeans(x: torch.Tensor, n: int, iterations: int = 25, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    codes = x[torch.randperm(len(x), generator=generator)[:n]].clone()
    for _ in range(iterations):
        assign = torch.cdist(x, codes).argmin(-1)
        sums = torch.zeros_like(codes).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n).unsqueeze(-1)
        codes = torch.where(counts > 0, sums / counts.clamp(min=1), codes)
    return codes


def positive_random_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """exp(w.x - |x|^2 / 2) per random direction w (up to one shared factor): E[phi(q).phi(k)] ~ exp(q.k)."""
    logits = x @ projection.T - (x * x).sum(-1, keepdim=True) / 2
    return (logits - logits.amax()).exp()


def second_copy(length: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions of the second copy (query t predicts token t + 1) and each one's target key: the
    token after the earlier occurrence of the query's own token."""
    queries = torch.arange(length + 1, total)
    return queries, queries - length + 1


def delta_rule_reads(keys: torch.Tensor, v: torch.Tensor, window: int, sinks: int, queries: torch.Tensor,
                     reads: torch.Tensor) -> torch.Tensor:
    """A delta-rule state over the keys that have left the window (sinks excluded), read at each query
    position with the given read vectors. keys, v: [T, d]; reads: [len(queries), d]."""
    keys, reads = F.normalize(keys, dim=-1), F.normalize(reads, dim=-1)
    state = torch.zeros(v.shape[-1], keys.shape[-1])
    out, step = [], 0
    for t in range(int(queries[-1]) + 1):
        j = t - window
        if j >= sinks:
            state = state + torch.outer(v[j] - state @ keys[j], keys[j])
        if step < len(queries) and t == queries[step]:
            out.append(state @ reads[step])
            step += 1
    return torch.stack(out)


def probe_head(mixer: HybridMixer, x: MixerInput, head: int, group: int, length: int, natural_keys,
               codes: int, seed: int) -> dict[str, float]:
    T = x.q.shape[2]
    window, sinks, scale = mixer.window_size, mixer.sink_tokens, mixer.scale
    pos = torch.arange(T)
    age = pos[:, None] - pos[None, :]
    causal = age >= 0
    near = causal & ((age < window) | (pos[None, :] < sinks))
    far = causal & ~near
    queries, target = second_copy(length, T)
    rows = torch.arange(len(queries))

    v = x.v[0, group].float()
    scores = (x.q[0, head] @ x.k[0, group].T).float() * scale
    teacher = scores.masked_fill(~causal, -math.inf).softmax(-1)[queries]
    reference = scores.masked_fill(~far, -math.inf)[queries].softmax(-1) @ v

    def cosine(weights: torch.Tensor) -> float:
        weights = weights.masked_fill(~far[queries], 0.0)
        out = weights @ v / weights.sum(-1, keepdim=True).clamp(min=1e-30)
        return F.cosine_similarity(out, reference, dim=-1).mean().item()

    def kernel(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q[queries] @ k.T * scale).masked_fill(~far[queries], -math.inf).softmax(-1)

    fq, fk = mixer.linear_features(x)
    linear = fq[0, head].float() @ fk[0, group].float().T
    if mixer.decay_logit is not None:
        linear = linear * (F.logsigmoid(mixer.decay_logit[group]).float() * age.clamp(min=0)).exp()
    linear = linear.masked_fill(~far, 0.0)[queries]
    c = scores.masked_fill(~near, -math.inf).amax(-1, keepdim=True)
    window_mass = (scores - c).exp().masked_fill(~near, 0.0)[queries].sum(-1)

    q, k = (x.q, x.k) if mixer.linear_rope else (x.q_nope, x.k_nope)
    q, k = q[0, head].float(), k[0, group].float()
    book = kmeans(natural_keys, codes, seed=seed)
    quantised = book[torch.cdist(k, book).argmin(-1)]
    generator = torch.Generator().manual_seed(seed)
    out = {
        "teacher far mass": teacher.masked_fill(~far[queries], 0.0).sum(-1).mean().item(),
        "teacher on target": teacher[rows, target].mean().item(),
        "linear share": (linear.sum(-1) / (linear.sum(-1) + window_mass)).mean().item(),
        "linear on target": (linear[rows, target] / linear.sum(-1).clamp(min=1e-30)).mean().item(),
        "cos uniform": cosine(torch.ones_like(linear)),
        "cos linear terms": cosine(linear),
        "cos exact exp": cosine(kernel(q, k)),
        f"cos vq {codes}": cosine(kernel(q, quantised)),
    }
    reads = delta_rule_reads(k, v, window, sinks, queries, k[target])
    unit = F.normalize(k, dim=-1)
    out["key cosine"] = ((unit @ unit.T).sum() - T).item() / (T * (T - 1))
    out["cos delta"] = F.cosine_similarity(reads, reference, dim=-1).mean().item()
    for n in (codes, 16 * codes):
        projection = torch.randn(n, q.shape[-1], generator=generator)
        root = scale**0.5
        phi_q, phi_k = positive_random_features(q * root, projection), positive_random_features(k * root, projection)
        out[f"cos prf {n}"] = cosine(phi_q[queries] @ phi_k.T)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="runs/default")
    parser.add_argument("--length", type=int, default=256, help="copy length L")
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--min-mass", type=float, default=0.3,
                        help="teacher attention on the target to count as an induction head")
    parser.add_argument("--codes", type=int, default=256, help="codebook size / random features")
    parser.add_argument("--natural-tokens", type=int, default=4096, help="corpus tokens the codebooks are fitted on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = load(args.student, device="cpu", dtype="float32")
    torch.manual_seed(args.seed)
    natural = build_blocks(tokenizer, "default", seq_len=1024, train_tokens=args.natural_tokens,
                           eval_tokens_per_domain=1024, seed=args.seed, eval_seq_len=1024).train
    natural_keys: dict[int, list[torch.Tensor]] = {}
    for block in natural:
        for index, (layer, x) in record(model, block[None]).items():
            keys = x.k if layer.mixer.linear_rope else x.k_nope
            natural_keys.setdefault(index, []).append(keys[0].float())
    sequences = copy_sequences(model.config.vocab_size, [args.length], per_length=args.sequences,
                               seed=args.seed)[args.length]
    results: dict[tuple[int, int], list[dict]] = {}
    for sequence in sequences:
        for index, (layer, x) in record(model, sequence[None]).items():
            mixer = layer.mixer
            if not isinstance(mixer, HybridMixer):
                raise SystemExit(f"bench/recall.py probes the hybrid's linear terms; layer {index} has "
                                 f"{type(mixer).__name__}")
            heads, kv_heads = x.q.shape[1], x.k.shape[1]
            scores = torch.einsum("htd,hsd->hts", x.q[0].float(),
                                  x.k[0].float().repeat_interleave(heads // kv_heads, 0)) * mixer.scale
            T = scores.shape[-1]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            queries, target = second_copy(args.length, T)
            mass = scores.masked_fill(~causal, -math.inf).softmax(-1)[:, queries, target]
            keys = torch.cat(natural_keys[index], dim=1)  # [Hk, tokens, d]
            for head in (mass.mean(-1) >= args.min_mass).nonzero().flatten().tolist():
                group = head // (heads // kv_heads)
                row = probe_head(mixer, x, head, group, args.length, keys[group], args.codes, args.seed)
                results.setdefault((index, head), []).append(row)

    if not results:
        raise SystemExit(f"no head puts >= {args.min_mass} of its attention on the copy target at L = {args.length}")
    columns = list(next(iter(results.values()))[0])
    print(f"copy test L = {args.length}, {len(sequences)} sequences; model {args.student}; induction heads: "
          f"teacher attention on the target >= {args.min_mass}\n")
    print("| layer.head | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    means = {c: [] for c in columns}
    for (index, head), rows in sorted(results.items()):
        values = {c: sum(r[c] for r in rows) / len(rows) for c in columns}
        for c in columns:
            means[c].append(values[c])
        print(f"| {index}.{head} | " + " | ".join(f"{values[c]:.3f}" for c in columns) + " |")
    print("| mean | " + " | ".join(f"{sum(m) / len(m):.3f}" for m in means.values()) + " |")


if __name__ == "__main__":
    main()
