#!/usr/bin/env bash
# KServe v2 (Open Inference Protocol) JSON requests to the pipeline
# Pipeline(model="mlp", inbox="requests", connector="kafka") with kcat, and their answers.
# KAFKA names a broker; INBOX and OUTBOX the topics; REPLY, if set, a reply topic of your own
# (made beforehand, its name starting with daskinfer-replies-) where the answers go instead.
set -euo pipefail
B=${KAFKA:-127.0.0.1:9092}
INBOX=${INBOX:-requests}
OUTBOX=${OUTBOX:-results}
HEADERS=(-H content-type=application/json)        # marks a v2 JSON request
if [ -n "${REPLY:-}" ]; then HEADERS+=(-H "reply-to=$REPLY"); fi

ZEROS=0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
HALVES=0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
# k1: two rows of the model's input x (float32 [N, 16]); k2: cut short, not JSON; k3: one row
printf '%s' '{"id":"k1","inputs":[{"name":"x","shape":[2,16],"datatype":"FP32","data":['"$ZEROS,$HALVES"']}]}' > k1.json
printf '%s' '{"id":"k2","inputs":[{"name":"x","shape":[1,16],"datatype":"FP32","data":[0,0,0' > k2.json
printf '%s' '{"id":"k3","inputs":[{"name":"x","shape":[1,16],"datatype":"FP32","data":['"$HALVES"']}]}' > k3.json

# the message key is the request's key: one key, one partition, answers in request order
for f in k1 k2 k3; do
  kcat -P -b "$B" -t "$INBOX" -k user-1 "${HEADERS[@]}" "$f.json"   # a file argument is one message
done

# the three answers: key user-1, headers correlation_id=<id> and content-type=application/json
kcat -C -b "$B" -t "${REPLY:-$OUTBOX}" -o beginning -c 3 -q -X isolation.level=read_committed \
  -f 'key %k, headers %h: %s\n'
