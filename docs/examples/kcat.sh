#!/usr/bin/env bash
# A request to the pipeline Pipeline(model="mlp", inbox="requests", connector="kafka") with kcat,
# and its result from the outbox topic.  KAFKA names a broker; INBOX and OUTBOX the topics.
set -euo pipefail
B=${KAFKA:-127.0.0.1:9092}
INBOX=${INBOX:-requests}
OUTBOX=${OUTBOX:-results}

# {"id": "k1", "k": "user-1", "in": {"x": float32 array of shape [16]}}: no "r", so the outbox
{ printf '\x83\xa2id\xa2k1\xa1k\xa6user-1\xa2in\x81\xa1x'
  printf '\xc7\x49\x01\x07\x00\x92\xa3<f4\x91\x10'
  head -c 64 /dev/zero
} > request.bin

# the partition of key "user-1" is crc32("user-1") % partitions; with kcat -p -1, Kafka's own
# partitioner picks one (per-key order holds as long as every producer of a key picks alike)
kcat -P -b "$B" -t "$INBOX" -p 0 -k user-1 request.bin   # a file argument is one message, byte for byte

# the result: key "user-1", header correlation_id=k1, the result message as the value
kcat -C -b "$B" -t "$OUTBOX" -o beginning -c 1 -q -X isolation.level=read_committed \
  -f 'key %k, headers %h, %S bytes:\n%s' > result.txt
head -c 64 result.txt | xxd
