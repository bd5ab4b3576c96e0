"""Direct transport: requests go from the client straight to the worker that owns their
partition, and results come straight back, over Dask's own comms (two hops; the
scheduler is not in the data path).

- :mod:`.endpoint`: the worker side (a worker extension): client connections and the
  bounded request queue of each partition hosted here.
- :mod:`.transport`: the client side (:class:`DirectTransport`): routes from the
  scheduler, one connection per worker, every request kept until it is answered and
  sent again to the new owner when its partition moves or its worker dies.
- :mod:`.protocol`: the messages (named ops, one dataclass each).
- :mod:`.link`: the batched streams both ends write (distributed's ``BatchedSend``) and
  the client's reader of the worker's stream.
"""

from daskinfer.connectors.direct.endpoint import ENDPOINT, DirectEndpoint
from daskinfer.connectors.direct.transport import DirectTransport

__all__ = ["ENDPOINT", "DirectEndpoint", "DirectTransport"]
