"""daskinfer configuration: defaults from ``daskinfer.yaml`` merged into ``dask.config``.

Users override any key with their own Dask config files, environment variables
(``DASK_DASKINFER__BATCHING__MAX_BATCH_SIZE=1024``) or ``dask.config.set``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import dask.config
import yaml
from dask.utils import parse_bytes, parse_timedelta

_DEFAULTS_PATH = os.path.join(os.path.dirname(__file__), "daskinfer.yaml")

with open(_DEFAULTS_PATH) as _f:
    defaults: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(defaults)

from daskinfer import config_check  # noqa: E402  (after the defaults: it checks what the user set on top)

config_check.warn_unknown(config_check.check_sources())


def get(key: str, value: Any = None) -> Any:
    """Return ``value`` unless it is None, else the config value ``daskinfer.<key>``."""
    if value is not None:
        return value
    return dask.config.get(f"daskinfer.{key}")


def get_seconds(key: str, value: Any = None) -> float:
    """Like :func:`get` for a duration; strings such as ``"10ms"`` become seconds."""
    seconds = parse_timedelta(get(key, value), default="s")
    return float(seconds or 0.0)


def get_bytes(key: str, value: Any = None) -> int:
    """Like :func:`get` for a size; strings such as ``"64MiB"`` become bytes."""
    v = get(key, value)
    return int(parse_bytes(v) if isinstance(v, str) else v)


def metrics_enabled() -> bool:
    """Prometheus metrics are on (``daskinfer.metrics.enabled``) and ``prometheus_client`` is installed."""
    return bool(get("metrics.enabled")) and importlib.util.find_spec("prometheus_client") is not None
