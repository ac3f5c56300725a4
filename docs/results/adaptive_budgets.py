"""Issue 15 item 3, measured before building it: do per-head (AdaKV) or per-layer (PyramidKV) budgets
beat one budget per head and layer on SmolLM2, at the same number of kept tokens?

Same samples as `kvtrt eval --task ppl` (prompt of --context tokens, 256 teacher-forced tokens). The
selection uses kvtrt's own prefill scores (its `score` outputs, the SnapKV observation window) and
kvtrt's SnapKV scoring (`SnapKVPolicy.token_scores`, sink and window always kept); the perplexity is
HF transformers' (the model dequantized from the same GGUF), with each layer's and KV head's evicted
prompt tokens masked out of every continuation query (eager attention, a 4D mask per layer), the prompt
compressed once (no re-compaction every 64 tokens, unlike kvtrt's runtime).

Allocations (all keep `keep` tokens per KV head on average, so the same KV bytes in total):
- uniform: every layer and head `keep` (kvtrt's runtime today);
- adakv: per layer, the `Hkv * keep` best (sink + window of every head first, then every head's best
  `alpha` share of its own budget, then the best remaining across heads), as AdaKV (kvpress
  AdaKVPress, alpha_safeguard 0.2);
- pyramid: layer l keeps a linearly decreasing share, `keep * (2 - 2 l / (L-1))` to within `keep / beta`
  (kvpress PyramidKVPress, beta 20; at least sink + window), every head alike;
- pyramid+adakv: both.

    python docs/results/adaptive_budgets.py /tmp/smol --texts /tmp/tune --num-texts 3 --budget 0.1,0.25 \
        --json docs/results/adaptive_budgets_tune.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from kvtrt.eval.accuracy import Evaluator
from kvtrt.eval.decoding import prefill
from kvtrt.models.loading import load_hf
from kvtrt.runtime.kv.policies import SnapKVPolicy, group_mass

ALLOCATIONS = ("uniform", "adakv", "pyramid", "pyramid+adakv")


def layer_budgets(keep: int, layers: int, pyramid: bool, floor: int, beta: int = 20) -> list[int]:
    """Tokens per KV head in each layer (at least `floor`, the sink + window); their sum is layers * keep."""
    if not pyramid:
        return [keep] * layers
    low = max(keep / beta, floor)
    high = 2 * keep - low
    raw = [high - (high - low) * l / (layers - 1) for l in range(layers)]
    out = [int(r) for r in raw]
    for i in sorted(range(layers), key=lambda i: raw[i] - out[i], reverse=True)[: layers * keep - sum(out)]:
        out[i] += 1
    return out


def kept_mask(policy: SnapKVPolicy, scores: torch.Tensor, keep: int, adaptive: bool, alpha: float = 0.2) -> torch.Tensor:
    """[Hkv, N] bool: the slots each KV head keeps, `keep` per head on average."""
    mass = group_mass(scores.numpy())                           # [Hkv,N] (the policies compute in numpy)
    heads, n = mass.shape
    keep = max(min(keep, n), policy.sink + policy.window)
    rank = torch.from_numpy(policy.token_scores(mass).copy())
    rank[:, : policy.sink] = float("inf")
    rank[:, n - policy.window:] = float("inf")
    if not adaptive:
        chosen = torch.from_numpy(policy.select(scores, keep))  # [Hkv,keep]
        return torch.zeros(heads, n, dtype=torch.bool).scatter_(1, chosen, True)
    mask = torch.zeros(heads, n, dtype=torch.bool)
    floor = policy.sink + policy.window + int(alpha * (keep - policy.sink - policy.window))
    own = rank.topk(floor, dim=1).indices
    mask.scatter_(1, own, True)
    rest = rank.masked_fill(mask, float("-inf")).flatten()
    extra = heads * keep - int(mask.sum())
    mask.view(-1)[rest.topk(extra).indices] = True
    return mask


class HFScorer:
    """HF transformers on one prompt: prefilled once, then every allocation's continuation scored on
    the same cache (cropped back to the prompt after each)."""

    def __init__(self, model, prompt: list[int]):
        from transformers import DynamicCache

        self.model, self.n = model, len(prompt)
        self.cache = DynamicCache()
        with torch.inference_mode():
            self.first = model(input_ids=torch.tensor([prompt]), cache=self.cache, logits_to_keep=1).logits[0, -1]

    def nll(self, targets: list[int], masks: list[torch.Tensor] | None) -> float:
        """Summed NLL (nats) of `targets` after the prompt; `masks[l]` [Hkv, n] bool: the prompt slots
        layer l's KV heads keep (None: all)."""
        model, n, m = self.model, self.n, len(targets) - 1
        c = model.config
        group = c.num_attention_heads // c.num_key_value_heads
        causal = torch.full((m, m), float("-inf")).triu(1)
        hooks = []
        for layer, module in enumerate(model.model.layers):
            mask = torch.zeros(1, c.num_attention_heads, m, n + m)
            mask[..., n:] = causal
            if masks is not None:
                hidden = ~masks[layer].repeat_interleave(group, dim=0)  # [H,n]
                mask[0, :, :, :n].masked_fill_(hidden[:, None, :], float("-inf"))

            def hook(mod, args, kwargs, mask=mask):
                kwargs["attention_mask"] = mask
                return args, kwargs

            hooks.append(module.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            with torch.inference_mode():
                rest = model(input_ids=torch.tensor([targets[:-1]]), position_ids=torch.arange(n, n + m)[None],
                             cache=self.cache).logits[0]
        finally:
            model.set_attn_implementation(previous)
            for h in hooks:
                h.remove()
            self.cache.crop(-m)  # back to the prompt
        logp = torch.cat([self.first[None], rest]).double().log_softmax(-1)
        return -float(logp.gather(1, torch.tensor(targets)[:, None]).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="kvtrt export folder (its prefill gives the scores)")
    ap.add_argument("--texts", default=None, help="folder of .txt texts (default: the haystack essays)")
    ap.add_argument("--num-texts", type=int, default=3, help="samples, one per text")
    ap.add_argument("--context", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--budget", default="0.1,0.25", help="comma-separated fractions of the context kept")
    ap.add_argument("--kernel", type=int, default=15, help="SnapKV pooling kernel")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--counts", action="store_true",
                    help="only print, per sample and budget, the largest per-head count adakv gives over `keep` "
                         "(the bytes a layout padded to the largest head would hold), no HF scoring")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ev = Evaluator(args.dir, args.context, texts=args.texts, num_texts=args.num_texts, progress=False)
    if args.counts:
        print("| sample | budget | keep | max count / keep (all layers) | mean over layers of the layer's max / keep |")
        print("|---|---|---|---|---|")
        for i, (prompt, _) in enumerate(ev._jobs("ppl", None, None)):
            store = prefill(ev.llm, prompt).store
            for b in [float(b) for b in args.budget.split(",")]:
                policy = SnapKVPolicy(budget=b, kernel=args.kernel)
                keep = policy.budget_tokens(len(prompt))
                counts = torch.stack([kept_mask(policy, torch.from_numpy(store.grouped_scores(l)[..., :len(prompt)]), keep, True).sum(1)
                                      for l in range(ev.llm.manifest.n_layers)]).float()  # [L,Hkv]
                print(f"| {i + 1} | {b:g} | {keep} | {counts.max() / keep:.2f} | {counts.max(1).values.mean() / keep:.2f} |")
        return
    model = load_hf(ev.llm.manifest.source)[0].eval()
    budgets = [float(b) for b in args.budget.split(",")]
    nll = {"full": 0.0, **{f"{a}@{b}": 0.0 for b in budgets for a in ALLOCATIONS}}
    tokens = 0
    for i, (prompt, targets) in enumerate(ev._jobs("ppl", None, None)):
        start = prefill(ev.llm, prompt)
        L = ev.llm.manifest.n_layers
        scores = [start.store.grouped_scores(l)[..., : len(prompt)] for l in range(L)]
        hf = HFScorer(model, prompt)
        nll["full"] += hf.nll(targets, None)
        for b in budgets:
            policy = SnapKVPolicy(budget=b, kernel=args.kernel)
            keep = policy.budget_tokens(len(prompt))
            for a in ALLOCATIONS:
                per_layer = layer_budgets(keep, L, "pyramid" in a, policy.sink + policy.window)
                masks = [kept_mask(policy, scores[l], per_layer[l], "adakv" in a) for l in range(L)]
                assert sum(int(mk.sum()) for mk in masks) == L * scores[0].shape[0] * keep
                nll[f"{a}@{b}"] += hf.nll(targets, masks)
        tokens += len(targets)
        print(f"sample {i + 1}: " + ", ".join(f"{k} {math.exp(v / tokens):.3f}" for k, v in nll.items()), flush=True)
    full = math.exp(nll["full"] / tokens)
    rows = [{"allocation": "full", "budget": None, "ppl": full, "ratio": 1.0}]
    print(f"| allocation | {' | '.join(f'{b:g}' for b in budgets)} |\n|---|{'---|' * len(budgets)}")
    for a in ALLOCATIONS:
        cells = []
        for b in budgets:
            ppl = math.exp(nll[f"{a}@{b}"] / tokens)
            rows.append({"allocation": a, "budget": b, "ppl": ppl, "ratio": ppl / full})
            cells.append(f"{ppl / full:.4f}")
        print(f"| {a} | {' | '.join(cells)} |")
    print(f"(perplexity ratio to the full cache, {full:.3f}; {args.num_texts} samples x {tokens // args.num_texts} tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
