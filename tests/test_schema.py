"""daskinfer.yaml and its JSON schema (daskinfer-schema.yaml) agree, and configuration is validated.

The schema is written by hand with the types and bounds of each key; these tests fail when a
key is added to one file and not the other, when a default has the wrong type, or when an
example in conf/ sets a key that does not exist.
"""

from __future__ import annotations

import glob
import os

import dask
import jsonschema
import pytest
import yaml

from daskinfer import Pipeline
from daskinfer.exceptions import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "daskinfer")


def _load(name: str) -> dict:
    with open(os.path.join(PKG, name)) as f:
        return yaml.safe_load(f)


SCHEMA = _load("daskinfer-schema.yaml")
DEFAULTS = _load("daskinfer.yaml")


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def _schema_leaves(node: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in node.get("properties", {}).items():
        if v.get("type") == "object":
            out |= _schema_leaves(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def test_every_default_has_a_schema_entry_and_every_entry_a_default():
    assert _leaves(DEFAULTS) == _schema_leaves(SCHEMA)


def test_the_defaults_validate():
    jsonschema.validate(DEFAULTS, SCHEMA)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "conf", "*.yaml"))), ids=os.path.basename)
def test_the_config_of_every_example_in_conf_validates(path):
    with open(path) as f:
        app = yaml.safe_load(f) or {}
    jsonschema.validate(app.get("config") or {"daskinfer": {}}, SCHEMA)


@pytest.mark.parametrize(
    "override, where",
    [
        ({"daskinfer": {"batching": {"max-batch-size": 0}}}, "max-batch-size"),
        ({"daskinfer": {"batching": {"max-bach-size": 10}}}, "max-bach-size"),
        ({"daskinfer": {"client": {"transport": "carrier-pigeon"}}}, "carrier-pigeon"),
    ],
)
def test_the_schema_catches_typos_and_bad_values(override, where):
    with pytest.raises(jsonschema.ValidationError, match=where):
        jsonschema.validate(override, SCHEMA)


def test_a_pipeline_with_a_setting_of_the_wrong_type_fails_at_deploy_naming_it():
    with dask.config.set({"daskinfer.direct.max-queued-messages": "many"}):
        with pytest.raises(ConfigError, match="direct_max_messages"):
            Pipeline(model="m").resolve()
