#!/bin/bash
# --max-wait-ms measured: Poisson arrivals at 2 and 8 requests/s, 0 vs 50 ms, the same 64 W prompts (64 output
# tokens). Usage: bash benchmarks/serve_max_wait.sh (from the repository root, after make setup).
cd "$(dirname "$0")/.."
.venv/bin/python - <<'PY'
import json
from benchmarks.serve_bench import prompts_w
ps = prompts_w(64)
with open("/tmp/mw_prompts.jsonl", "w") as f:
    for p in ps:
        f.write(json.dumps({"prompt": p["prompt"], "max_tokens": 64}) + "\n")
PY
for rate in 2 8; do
for mw in 0 50; do
  port=$((8700 + mw + rate))
  .venv/bin/tokenmill serve --port $port --max-wait-ms $mw > /tmp/mw_server.log 2>&1 &
  pid=$!
  until curl -sf 127.0.0.1:$port/health > /dev/null; do sleep 0.3; done
  echo "== rate $rate max_wait_ms $mw"
  .venv/bin/python -m benchmarks.serve_load --base-url http://127.0.0.1:$port/v1 --prompts /tmp/mw_prompts.jsonl --request-rate $rate --ignore-eos | python3 -c "
import json,sys; r=json.load(sys.stdin)
print(json.dumps({k: r[k] for k in ('output_tok_s','request_throughput','failed')}), 'TTFT', {k: round(v) for k,v in r['ttft_ms'].items()}, 'TPOT', {k: round(v,1) for k,v in r['tpot_ms'].items()})"
  kill -TERM $pid; wait $pid
done
done
