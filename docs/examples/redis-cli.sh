#!/usr/bin/env bash
# Two requests to the pipeline Pipeline(model="mlp", inbox="requests", connector="redis") from a
# shell, and their results.  REDIS_URL names the server; INBOX the pipeline's inbox.
set -euo pipefail
R="redis-cli -u ${REDIS_URL:-redis://127.0.0.1:6379/0}"
INBOX=${INBOX:-requests}
REPLY=daskinfer-replies-sh        # a reply stream of my own: 20 bytes, so msgpack \xb4 (str of 20)

$R HGET "$INBOX:meta" partitions          # the inbox's partitions: streams $INBOX:0, $INBOX:1, ...
$R DEL "$REPLY" > /dev/null
$R XADD "$REPLY" MAXLEN 0 '*' d '' > /dev/null   # it must exist before the results come (MAXLEN 0: empty)

# r1: {"id": "r1", "r": "daskinfer-replies-sh", "in": {"x": float32 array of shape [16]}}
{ printf '\x83\xa2id\xa2r1\xa1r\xb4daskinfer-replies-sh\xa2in\x81\xa1x'
  printf '\xc7\x49\x01'                # ext 8: 73 bytes of extension type 1 (an array) follow
  printf '\x07\x00\x92\xa3<f4\x91\x10' # header of 7 bytes (uint16, little-endian): ["<f4", [16]]
  head -c 64 /dev/zero                 # the 16 float32 values (here all 0.0), little-endian
} | $R -x XADD "$INBOX:0" '*' d        # -x: the value of field d from stdin, byte for byte

# r2: the same with 15 values: the model expects 16, so its result is an error
{ printf '\x83\xa2id\xa2r2\xa1r\xb4daskinfer-replies-sh\xa2in\x81\xa1x'
  printf '\xc7\x45\x01\x07\x00\x92\xa3<f4\x91\x0f'
  head -c 60 /dev/zero
} | $R -x XADD "$INBOX:0" '*' d

until [ "$($R XLEN "$REPLY")" -ge 2 ]; do sleep 0.1; done
$R --no-raw XRANGE "$REPLY" - +       # the results, each a msgpack map in field d (bytes as \xNN)
