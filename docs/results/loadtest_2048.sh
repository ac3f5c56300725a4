#!/usr/bin/env bash
# kvtrt serve (full, kvcrush, freekv), then transformers serve, one after the other on one host:
# 2048-token haystack prompts, 128 new tokens, concurrency 1/4/8/16, 16 requests per level.
# Usage: bash docs/results/loadtest_2048.sh [EXPORT_DIR] [HF_DIR] [OUT_DIR]   (server logs in /tmp/lt)
set -euo pipefail
EXPORT=${1:-/tmp/smol}; HF=${2:-/tmp/peers/smollm2-hf}; OUT=${3:-docs/results}; mkdir -p /tmp/lt
COMMON=(--concurrency 1,4,8,16 --prompt-tokens 2048 --max-tokens 128 --requests 16)

wait_ready() { for _ in $(seq 600); do curl -sf "$1" >/dev/null && return 0; sleep 1; done; return 1; }
stop() { kill -TERM "$1"; wait "$1" || true; }

for KV in full kvcrush:budget=0.25 freekv:budget=1024; do
  NAME=${KV%%:*}
  kvtrt serve "$EXPORT" --port 8000 --threads 2 --kv "$KV" >/tmp/lt/kvtrt-$NAME.log 2>&1 &
  SERVER=$!; wait_ready http://127.0.0.1:8000/health
  kvtrt loadtest http://127.0.0.1:8000 "${COMMON[@]}" --ignore-eos --label "kvtrt $KV" --server-pid $SERVER \
    --json "$OUT/loadtest2048-kvtrt-$NAME.json"
  stop $SERVER
done

# transformers serve refuses ignore_eos (422): it runs without it and stops at EOS
transformers serve "$HF" --port 8001 --continuous-batching --device cpu --dtype float32 >/tmp/lt/transformers.log 2>&1 &
PEER=$!; wait_ready http://127.0.0.1:8001/v1/models
kvtrt loadtest http://127.0.0.1:8001 --model "$HF" "${COMMON[@]}" --label "transformers serve (CB)" \
  --server-pid $PEER --json "$OUT/loadtest2048-transformers.json" \
  --compare "$OUT"/loadtest2048-kvtrt-{full,kvcrush,freekv}.json --plot "$OUT/loadtest2048.png"
stop $PEER
