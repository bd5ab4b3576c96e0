"""Configuration: every default in daskinfer.yaml is loaded into dask.config and documented,
and overrides are read at call time."""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import subprocess
import sys

import dask
import dask.utils
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


PACKAGE = os.path.dirname(daskinfer.__file__)
ACCESSORS = {"get": "value", "get_seconds": "duration", "get_bytes": "size"}


def _scan_package():
    """What the package's code reads: ``{key: {accessor names}}`` for literal keys given to
    ``settings.get*`` / ``dask.config.get``, the prefixes of f-string keys, and every string constant."""
    reads: dict[str, set[str]] = {}
    prefixes: set[str] = set()
    constants: set[str] = set()
    for dirpath, _, files in os.walk(PACKAGE):
        for fn in files:
            if not fn.endswith(".py"):
                continue
            with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    constants.add(node.value)
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
                    continue
                owner = ast.unparse(node.func.value)
                name, arg = node.func.attr, node.args[0]
                if owner == "settings" and name in ACCESSORS:
                    prefix = ""
                elif owner == "dask.config" and name == "get":
                    prefix, name = "daskinfer.", "get"
                else:
                    continue
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if prefix and not arg.value.startswith(prefix):
                        continue  # one of Dask's own keys (e.g. scheduler-address), not ours
                    key = arg.value if prefix == "" else arg.value.removeprefix(prefix)
                    reads.setdefault(f"daskinfer.{key}", set()).add(name)
                elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                    head = arg.values[0].value
                    prefixes.add(head if head.startswith("daskinfer.") else f"daskinfer.{head}")
    return reads, prefixes, constants


READS, PREFIXES, CONSTANTS = _scan_package()


def test_the_yaml_holds_only_the_daskinfer_section():
    assert list(DEFAULTS) == ["daskinfer"]


def test_the_scan_sees_the_reads_it_must_see():
    """The scanner finds reads through each accessor (so the checks below check something)."""
    assert "value" in [ACCESSORS[a] for a in READS["daskinfer.batching.max-batch-size"]]
    assert READS["daskinfer.remote.timeout"] == {"get_seconds"}
    assert READS["daskinfer.codec.max-message-size"] == {"get_bytes"}
    assert "daskinfer.redis." in PREFIXES  # redis options are read as f"redis.{key}"


def test_every_key_the_code_reads_is_in_the_yaml():
    missing = sorted(k for k in READS if k not in LEAVES)
    assert missing == [], f"keys read in daskinfer but missing from daskinfer.yaml: {missing}"


def test_every_yaml_key_is_read_by_the_code():
    def used(key: str) -> bool:
        if key in READS:
            return True
        return any(key.startswith(p) and key[len(p) :] in CONSTANTS for p in PREFIXES)

    unused = sorted(k for k in LEAVES if not used(k))
    assert unused == [], f"keys in daskinfer.yaml that no code reads: {unused}"


def test_durations_and_sizes_in_the_yaml_parse_as_the_code_reads_them():
    """The schema the code implies: keys read with ``get_seconds`` are durations, ``get_bytes`` sizes."""
    bad = []
    for key, accessors in READS.items():
        value = LEAVES.get(key)
        for accessor in accessors:
            try:
                if accessor == "get_seconds":
                    dask.utils.parse_timedelta(value, default="s")
                elif accessor == "get_bytes" and isinstance(value, str):
                    dask.utils.parse_bytes(value)
            except Exception as e:
                bad.append(f"{key}: {value!r} ({accessor}: {e})")
    assert bad == []


def test_the_defaults_are_in_dask_config_after_import_daskinfer():
    """A fresh interpreter, no DASK_* variables: ``import daskinfer`` loads the whole YAML."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    code = "import json, dask, daskinfer; print(json.dumps(dask.config.get('daskinfer')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert json.loads(out.stdout) == json.loads(json.dumps(DEFAULTS["daskinfer"]))


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
        nxt = next((ln for ln in lines[i + 1 :] if ln.strip()), "")
        is_section = len(nxt) - len(nxt.lstrip()) > len(indent) and not nxt.strip().startswith("-")
        if is_section:
            continue
        items = [ln for ln in lines[i + 1 :] if ln.strip().startswith("- ")]
        if nxt.strip().startswith("- ") and any("#" in ln for ln in items):
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
    with dask.config.set(
        {"daskinfer.onnx.intra-op-num-threads": 3, "daskinfer.onnx.graph-optimization-level": "basic"}
    ):
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
