"""Regenerate ``grpc_predict_v2_pb2.py`` and ``grpc_predict_v2_pb2_grpc.py`` from the .proto.

Run from anywhere, with grpcio-tools installed (``pip install grpcio-tools``)::

    python -m daskinfer.remote.proto.regenerate

After protoc, two edits keep the generated modules importable across the protobuf
and grpcio releases daskinfer supports:

- the protobuf runtime-version check (``_runtime_version.ValidateProtobufRuntimeVersion``)
  is removed: it refuses any runtime older than the protoc that generated the file,
  while the code itself (``AddSerializedFile`` + ``builder``) works with protobuf >= 4.21;
- the messages are built in a private descriptor pool, not protobuf's default one, so that
  daskinfer can be imported next to other copies of the same protocol (tritonclient,
  kserve and mlserver each register ``inference.ModelInferRequest`` in the default pool);
- in ``*_pb2_grpc.py`` the import of the message module becomes package-relative, and
  the grpcio version floor becomes 1.62 (the first release with ``_registered_method``).
"""

from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = "grpc_predict_v2.proto"
GRPC_FLOOR = "1.62.0"


def main() -> int:
    from grpc_tools import protoc

    rc = protoc.main(
        ["protoc", f"-I{HERE}", f"--python_out={HERE}", f"--grpc_python_out={HERE}", os.path.join(HERE, PROTO)]
    )
    if rc != 0:
        return rc
    pb2 = os.path.join(HERE, "grpc_predict_v2_pb2.py")
    with open(pb2) as f:
        text = f.read()
    text = text.replace("from google.protobuf import runtime_version as _runtime_version\n", "")
    text = re.sub(
        r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n",
        "# (protobuf runtime-version check removed by daskinfer/remote/proto/regenerate.py)\n",
        text,
    )
    text = text.replace(
        "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
        "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(",
    )
    with open(pb2, "w") as f:
        f.write(text)
    grpc_file = os.path.join(HERE, "grpc_predict_v2_pb2_grpc.py")
    with open(grpc_file) as f:
        text = f.read()
    text = text.replace("import grpc_predict_v2_pb2 as", "from . import grpc_predict_v2_pb2 as")
    text = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", f"GRPC_GENERATED_VERSION = '{GRPC_FLOOR}'", text)
    with open(grpc_file, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
