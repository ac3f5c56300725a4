"""Prefill time (TTFT with one new token) of 3000-token haystack prompts with ONNX Runtime's MatMul
(KVTRT_MATMUL_KERNEL=0) and kvtrt's PackedMatMul (=1), one process per setting, the settings alternating
(the order flipped each round); each process reports the median of 3 prompts. Results: `packed_matmul.md`.

    python docs/results/packed_matmul_ttft.py /tmp/smol --tokens 3000 --rounds 4
"""

import argparse
import os
import subprocess
import sys

CHILD = r'''
import glob, os, sys, numpy as np, kvtrt
llm = kvtrt.load(sys.argv[1], threads=2)
texts = sorted(glob.glob(os.path.join(os.environ.get("KVTRT_TEXTS", "../shared/data/haystack"), "*.txt")))
ids = llm.encode(" ".join(open(t).read() for t in texts[:20]), chat=False)
llm.generate(ids[:200], max_new_tokens=2)  # warm-up
n = int(sys.argv[2])
ttft = [llm.generate(ids[i * (n + 100): i * (n + 100) + n], max_new_tokens=1).stats.ttft_s for i in range(3)]
print(f"{float(np.median(ttft)):.3f} s ({llm.engine.matmul})")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="a kvtrt export (fp32)")
    parser.add_argument("--tokens", type=int, default=3000, help="prompt tokens")
    parser.add_argument("--rounds", type=int, default=4, help="processes per setting")
    args = parser.parse_args()
    for r in range(args.rounds):
        for setting in ("0", "1") if r % 2 == 0 else ("1", "0"):
            env = dict(os.environ, KVTRT_MATMUL_KERNEL=setting)
            out = subprocess.run([sys.executable, "-c", CHILD, args.directory, str(args.tokens)], env=env,
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            print(f"round {r + 1} KVTRT_MATMUL_KERNEL={setting}: TTFT {out}", flush=True)


if __name__ == "__main__":
    main()
