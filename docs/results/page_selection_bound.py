"""How good can page selection be at budget 1024? Simulated in HF transformers attention.

Teacher-forced perplexity of the 256 tokens after a 7680-token prefix (the `kvtrt eval --task ppl`
samples), SmolLM2-135M fp32, where each of those 256 queries attends, per layer and KV head, to the
sink (4), the recent tokens (64-95, whole pages) and k = 29 pages of 32 chosen by:

- quest:         Quest's bound with the query itself (kvtrt's `quest` mode, softmax group combine)
- quest_dense01: the same with layers 0 and 1 attending to everything (what Quest/FreeKV do)
- oracle_page:   the 29 pages with the most true attention mass (the group's heads summed)
- oracle_token:  the same number of tokens, chosen one by one by true attention mass

The prefix itself is prefilled densely, as kvtrt does. Usage (about 2-4 min per text on 2 cores):

    python docs/results/page_selection_bound.py 3 [quest_dense01]

Results are in docs/results/README.md ("How far page selection can go").
"""
import math, sys, time, torch, torch.nn.functional as F
from transformers import AttentionInterface
from kvtrt.models.loading import load_hf
from kvtrt.eval.texts import load_texts, token_prefix
torch.set_num_threads(2)
N, M, S, W, PG, K = 7680, 256, 4, 64, 32, 29
CFG = {"dense": set()}

def quest_attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    B, H, T, D = query.shape
    hkv = key.shape[1]; g = H // hkv
    scaling = scaling or D ** -0.5
    kf = key.repeat_interleave(g, 1); vf = value.repeat_interleave(g, 1)
    out = torch.empty(B, H, T, D)
    p = T - M
    out[:, :, :p] = F.scaled_dot_product_attention(query[:, :, :p], kf[:, :, :p], vf[:, :, :p], is_causal=True)
    q = query[:, :, p:]                                   # [B,H,M,D]
    logits = (q @ kf.transpose(-1, -2)) * scaling         # [B,H,M,T]
    pos = torch.arange(T)
    allow = torch.zeros(B, H, M, T, dtype=torch.bool)
    for i in range(M):
        t = p + i; n = t + 1
        if CFG["mode"] == "full" or module.layer_idx in CFG["dense"]:
            allow[:, :, i, :n] = True; continue
        npg = max(0, (n - S - W) // PG)
        lo = S + npg * PG
        allow[:, :, i, :S] = True; allow[:, :, i, lo:n] = True
        if npg == 0: continue
        if CFG["mode"] == "oracle_token":
            mass = torch.softmax(logits[:, :, i, :n], -1).reshape(B, hkv, g, n).sum(2)  # [B,hkv,n]
            mass[..., :S] = float("inf"); mass[..., lo:n] = float("inf")
            keep = mass.topk(min(n, S + K * PG + (n - lo)), -1).indices
            m2 = torch.zeros(B, hkv, n, dtype=torch.bool); m2.scatter_(-1, keep, True)
            allow[:, :, i, :n] = m2.repeat_interleave(g, 1); continue
        if CFG["mode"] == "oracle_page":
            mass = torch.softmax(logits[:, :, i, :n], -1)[..., S:lo].reshape(B, hkv, g, npg, PG).sum((2, 4))
            comb = mass
        else:
            kp = key[:, :, S:lo].reshape(B, hkv, npg, PG, D)
            kmin, kmax = kp.amin(3), kp.amax(3)               # [B,hkv,npg,D]
            qi = q[:, :, i].reshape(B, hkv, g, D)
            sc = qi.clamp(min=0) @ kmax.transpose(-1, -2) + qi.clamp(max=0) @ kmin.transpose(-1, -2)  # [B,hkv,g,npg]
            comb = torch.softmax(sc * scaling, -1).mean(2)    # [B,hkv,npg]
        top = comb.topk(min(K, npg), -1).indices          # [B,hkv,k]
        sel = torch.zeros(B, hkv, npg, dtype=torch.bool); sel.scatter_(-1, top, True)
        tok = sel.repeat_interleave(PG, -1).repeat_interleave(g, 1)  # [B,H,npg*PG]
        allow[:, :, i, S:lo] = tok
    logits = logits.masked_fill(~allow, float("-inf"))
    out[:, :, p:] = torch.softmax(logits, -1) @ vf
    return out.transpose(1, 2).contiguous(), None

AttentionInterface.register("questsim", quest_attn)
model, tok = load_hf("smollm2-135m")
model.config._attn_implementation = "questsim"
for m in model.modules():
    if hasattr(m, "config"): m.config._attn_implementation = "questsim"
corpus = load_texts(None)
ALL = {"full": set(), "quest": set(), "quest_dense01": {0, 1}, "oracle_page": set(), "oracle_token": set()}
names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["full", "quest", "oracle_page", "oracle_token"]
configs = [(n, ALL[n]) for n in ["full", *[n for n in names if n != "full"]]]
nll = {c: 0.0 for c, _ in configs}
ntext = int(sys.argv[1]) if len(sys.argv) > 1 else 3
enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
for i in range(ntext):
    ids = token_prefix(enc, corpus[i:] + corpus[:i], N + M)
    x = torch.tensor([ids])
    for name, dense in configs:
        CFG["mode"] = "quest" if name == "quest_dense01" else name; CFG["dense"] = dense
        t0 = time.time()
        with torch.no_grad():
            logits = model(x).logits[0, N - 1:N + M - 1]
        lp = torch.log_softmax(logits.float(), -1)
        nll[name] += -lp.gather(1, x[0, N:N + M, None]).sum().item()
        print(i, name, f"{time.time()-t0:.0f}s", flush=True)
    base = math.exp(nll["full"] / ((i + 1) * M))
    print({c: round(math.exp(v / ((i + 1) * M)) / base, 4) for c, v in nll.items()}, "full ppl", round(base, 2), flush=True)
