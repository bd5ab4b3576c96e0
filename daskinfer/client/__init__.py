"""The client: send requests to a pipeline and get their results.

>>> ic = InferenceClient(client, inbox="requests")             # doctest: +SKIP
>>> ic.submit({"x": row}).result().value()                     # one row   # doctest: +SKIP
>>> ic.predict({"x": block})                                   # a block, one message  # doctest: +SKIP

- :mod:`.core`: :class:`InferenceClient` (lifecycle, submit/predict/send/results, futures,
  answers delivered once).
- :mod:`.outgoing`: requests on their way out, flushed into frames per partition.
"""

from daskinfer.client.core import InferenceClient

__all__ = ["InferenceClient"]
