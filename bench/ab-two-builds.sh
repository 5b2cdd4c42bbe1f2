#!/bin/bash
# Paired A/B of two Kiln builds on MiniLM embeddings: both servers up at once on the same model
# folder and plugin, rounds alternate their order; peers-load (ours) and wrk (independent).
set -euo pipefail
# Edit: the two builds, a peers-load binary, and a repository with `cargo xtask setup` done.
OLD=${OLD:-/tmp/kiln/kiln-old}; NEW=${NEW:-/tmp/kiln/kiln-new}; PEERS_LOAD=${PEERS_LOAD:-/tmp/kiln/peers-load}
mkdir -p "${WORK:-/tmp/kiln/ab}"; W=${WORK:-/tmp/kiln/ab}; REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
ORT=$(ls $REPO/.kiln/onnxruntime/libonnxruntime.so.1.31.1)
rm -rf $W/models $W/old $W/new; mkdir -p $W/models/demo $W/old $W/new
cp -a $REPO/.kiln/models/demo/minilm $W/models/demo/
sed -i "s|^path = .*|path = \"$REPO/.kiln/plugins/embeddings.wasm\"|" $W/models/demo/minilm/model.toml
start() { # name bin port
  local db=$W/$1/kiln.db bin=$2
  KILN_DATABASE_URL=$db $bin admin user create bench --plan enterprise >/dev/null
  KILN_DATABASE_URL=$db $bin admin token create bench > $W/$1/token
  KILN_DATABASE_URL=$db $bin admin plugin allow $REPO/.kiln/plugins/embeddings.wasm --note ab >/dev/null
  KILN_DATABASE_URL=$db $bin admin model set-visibility demo/minilm public >/dev/null 2>&1 || true
  KILN_DATABASE_URL=$db KILN_ADDR=127.0.0.1:$3 KILN_MODELS_DIR=$W/models KILN_CACHE_DIR=$W/$1/cache \
    KILN_ORT_DYLIB=$ORT RUST_LOG=warn $bin serve > $W/$1/log 2>&1 &
  echo $! > $W/$1/pid
}
start old $OLD 18081
start new $NEW 18082
for p in 18081 18082; do for i in $(seq 60); do curl -sf localhost:$p/health >/dev/null && break; sleep 1; done; done
cat > $W/body.lua <<LUA
wrk.method = "POST"
wrk.body = '{"model": "demo/minilm", "inputs": "A man is eating a piece of bread.", "options": {"use_cache": false}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
LUA
round() { # name port conns
  local tok=$(cat $W/$1/token)
  local pl=$($PEERS_LOAD run kiln 127.0.0.1:$2 --token $tok --connections $3 --seconds ${SECS:-5} --warmup 1)
  local wk=$(TOKEN=$tok wrk -t1 -c$3 -d${SECS:-5}s --latency -s $W/body.lua http://127.0.0.1:$2/v1/inference/embeddings | awk '/Requests\/sec/{r=$2} /^ +50%/{p50=$2} /^ +99%/{p99=$2} END{print "wrk_rps="r" wrk_p50="p50" wrk_p99="p99}')
  echo "$1 c=$3 $pl $wk"
}
for r in $(seq ${ROUNDS:-4}); do
  for c in 1 32; do
    if (( r % 2 )); then round old 18081 $c; round new 18082 $c; else round new 18082 $c; round old 18081 $c; fi
  done
done
kill $(cat $W/old/pid) $(cat $W/new/pid)
