"""Configuration: every default in daskinfer.yaml is loaded into dask.config and documented,
and overrides are read at call time."""

from __future__ import annotations

import copy
import os
import re

import dask
import pytest
import yaml

import daskinfer
from daskinfer import BatchPolicy, OnnxModel, PythonModel, settings
from daskinfer.exceptions import ConfigError

YAML_PATH = os.path.join(os.path.dirname(daskinfer.__file__), "daskinfer.yaml")


def _leaves(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from _leaves(v, key)
        else:
            yield key, v


def _all_keys(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        yield key
        if isinstance(v, dict):
            yield from _all_keys(v, key)


with open(YAML_PATH) as f:
    DEFAULTS = yaml.safe_load(f)
LEAVES = dict(_leaves(DEFAULTS))


def test_yaml_has_a_daskinfer_section_with_keys():
    assert list(DEFAULTS) == ["daskinfer"]
    assert len(LEAVES) >= 20


@pytest.mark.parametrize("key", sorted(LEAVES))
def test_every_yaml_key_is_readable_through_dask_config(key):
    assert dask.config.get(key) == LEAVES[key]


def test_every_yaml_key_has_a_comment():
    """Each key line carries an inline comment, or (for a key holding a list) its items do."""
    with open(YAML_PATH) as f:
        lines = f.read().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_-]+):(.*)$", line)
        if not m:
            continue
        indent, key, rest = m.groups()
        if not indent:  # the top-level ``daskinfer:`` section
            continue
        if "#" in rest:
            continue
        # a section header (``batching:``) or a key whose list value follows on the next lines
        nxt = next((l for l in lines[i + 1 :] if l.strip()), "")
        is_section = len(nxt) - len(nxt.lstrip()) > len(indent) and not nxt.strip().startswith("-")
        if is_section:
            continue
        items = [l for l in lines[i + 1 :] if l.strip().startswith("- ")]
        if nxt.strip().startswith("- ") and any("#" in l for l in items):
            continue
        uncommented.append(key)
    assert uncommented == [], f"keys without a comment: {uncommented}"


def test_keys_are_kebab_case():
    bad = [k for k in _all_keys(DEFAULTS) if not re.fullmatch(r"[a-z0-9.-]+", k)]
    assert bad == []


def test_environment_variable_override_reaches_the_key():
    env = dask.config.collect_env({"DASK_DASKINFER__BATCHING__MAX_BATCH_SIZE": "1024"})
    cfg = dask.config.update(copy.deepcopy(dask.config.config), env)
    assert dask.config.get("daskinfer.batching.max-batch-size", config=cfg) == 1024
    assert dask.config.get("daskinfer.batching.max-inflight", config=cfg) == LEAVES["daskinfer.batching.max-inflight"]


def test_config_set_override_is_honoured_at_call_time():
    with dask.config.set({"daskinfer.batching.max-batch-size": 17}):
        assert settings.get("batching.max-batch-size") == 17
        assert BatchPolicy.from_config().max_batch_size == 17
    assert BatchPolicy.from_config().max_batch_size == LEAVES["daskinfer.batching.max-batch-size"]


def test_batch_policy_from_config_parses_durations():
    with dask.config.set({"daskinfer.batching.max-delay": "250us"}):
        assert BatchPolicy.from_config().max_delay == pytest.approx(250e-6)
    with dask.config.set({"daskinfer.batching.max-inflight": 0}):
        with pytest.raises(ConfigError, match="max_inflight must be >= 1, got 0"):
            BatchPolicy.from_config()


def test_get_helpers_prefer_explicit_values():
    assert settings.get("batching.max-batch-size", 3) == 3
    assert settings.get_seconds("models.pip-timeout") == 300.0
    assert settings.get_seconds("models.pip-timeout", "2m") == 120.0
    assert settings.get_bytes("codec.max-message-size") == 64 * 2**20
    assert settings.get_bytes("codec.max-message-size", "1KiB") == 1024
    assert settings.get_bytes("codec.max-message-size", 10) == 10


def test_onnx_settings_follow_config_at_call_time(mlp_path):
    with dask.config.set({"daskinfer.onnx.intra-op-num-threads": 3, "daskinfer.onnx.graph-optimization-level": "basic"}):
        model = OnnxModel("mlp", mlp_path)
    assert model.intra_op_num_threads == 3
    assert model.graph_optimization_level == "basic"
    assert model.session_options().intra_op_num_threads == 3
    with dask.config.set({"daskinfer.onnx.graph-optimization-level": "ludicrous"}):
        with pytest.raises(ConfigError, match="graph_optimization_level must be one of"):
            OnnxModel("mlp", mlp_path)


def test_model_settings_follow_config_at_call_time():
    with dask.config.set({"daskinfer.models.instances": 3, "daskinfer.models.warmup": False}):
        model = PythonModel("m", lambda x: x)
    assert (model.instances, model.warmup) == (3, False)
    default = PythonModel("m", lambda x: x)
    assert (default.instances, default.warmup) == (1, True)
    with dask.config.set({"daskinfer.models.instances": 0}):
        with pytest.raises(ConfigError, match=r"model 'm': instances must be >= 1, got 0"):
            PythonModel("m", lambda x: x)
