#!/usr/bin/env bash
# KServe v2 (Open Inference Protocol) requests to the pipeline
# Pipeline(model="mlp", inbox="requests", connector="redis") from a shell, and their answers.
# REDIS_URL names the server; INBOX the pipeline's inbox.
set -euo pipefail
R="redis-cli -u ${REDIS_URL:-redis://127.0.0.1:6379/0}"
INBOX=${INBOX:-requests}
REPLY=daskinfer-replies-v2sh            # a reply stream of my own (the prefix daskinfer-replies- is allowed)

$R DEL "$REPLY" > /dev/null
$R XADD "$REPLY" MAXLEN 0 '*' d '' > /dev/null   # it must exist before the answers come (MAXLEN 0: empty)

ZEROS=0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
HALVES=0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5

# r1: two rows of the model's input x (float32 [N, 16]); the fields next to d mark it and say
# where the answer goes
$R XADD "$INBOX:0" '*' content-type application/json reply-to "$REPLY" \
  d '{"id":"r1","inputs":[{"name":"x","shape":[2,16],"datatype":"FP32","data":['"$ZEROS,$HALVES"']}]}' > /dev/null

# r2: malformed, a shape [1, 16] with 15 values: an error answer for this request alone
$R XADD "$INBOX:0" '*' content-type application/json reply-to "$REPLY" \
  d '{"id":"r2","inputs":[{"name":"x","shape":[1,16],"datatype":"FP32","data":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]}]}' > /dev/null

# r3: one row, after the malformed one
$R XADD "$INBOX:0" '*' content-type application/json reply-to "$REPLY" \
  d '{"id":"r3","inputs":[{"name":"x","shape":[1,16],"datatype":"FP32","data":['"$HALVES"']}]}' > /dev/null

# r4: binary tensor data: a JSON header of ${#HEAD} bytes, then the 64 bytes of 16 float32 zeros;
# the output is asked for as binary data too
HEAD='{"id":"r4","inputs":[{"name":"x","shape":[1,16],"datatype":"FP32","parameters":{"binary_data_size":64}}],'
HEAD+='"outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]}'
{ printf '%s' "$HEAD"; head -c 64 /dev/zero; } | $R -x XADD "$INBOX:0" '*' content-type application/octet-stream \
  inference-header-content-length "${#HEAD}" reply-to "$REPLY" d > /dev/null   # -x: d's value from stdin

# the four answers as they come (in any order: r2 was refused before it reached the model)
last=0-0
for _ in 1 2 3 4; do
  last=$($R --raw XREAD COUNT 1 BLOCK 60000 STREAMS "$REPLY" "$last" | sed -n 2p)
  [ -n "$last" ] || { echo "no answer within 60 s" >&2; exit 1; }
  $R --raw XRANGE "$REPLY" "$last" "$last" | tail -n +2   # the entry's fields and values, one a line
done
