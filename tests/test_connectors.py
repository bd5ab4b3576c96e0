"""Connectors are plugins: one found through the ``daskinfer.connectors`` entry-point group runs a
pipeline with no change to daskinfer, and daskinfer's own three register the same way."""

from __future__ import annotations

import ast
import importlib
import os
import pathlib

import pytest
from file_connector import FileConnector, FileTransport

import daskinfer
from daskinfer import InferenceClient, Pipeline, deploy_pipeline
from daskinfer.connectors.registry import (
    ConnectorPlugin,
    connector_names,
    connector_reference,
    get_connector,
    load_connector,
)
from daskinfer.exceptions import ConfigError
from daskinfer.testing import check_rows_and_blocks


@pytest.fixture
def files_entry_point(tmp_path, monkeypatch):
    """An installed distribution (a dist-info on sys.path) whose entry point names the test's connector."""
    site = tmp_path / "site"
    dist = site / "daskinfer_files_connector-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: daskinfer-files-connector\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[daskinfer.connectors]\nfiles = file_connector:FileConnector\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield "files"


def test_a_connector_from_an_entry_point_runs_a_pipeline(client, mlp_deployed, mlp_path, tmp_path, files_entry_point):
    assert "files" in connector_names()
    assert isinstance(get_connector("files"), FileConnector)
    root = str(tmp_path / "broker")
    pipe = Pipeline(
        model=mlp_deployed, inbox="file-inbox", partitions=2, connector="files", connector_options={"root": root}
    )
    handle = deploy_pipeline(client, pipe)
    try:
        with InferenceClient(client, inbox="file-inbox", transport=FileTransport(root)) as ic:
            check_rows_and_blocks(ic, 300, mlp_path)  # every request once, equal to onnxruntime, in key order
        status = handle.status()
    finally:
        handle.stop()
    assert status["connector"] == "files" and len(status["runners"]) == 2
    for p in range(2):
        assert os.listdir(os.path.join(root, "file-inbox", str(p))) == [], "answered requests are deleted"


def test_an_unknown_connector_fails_the_deploy_naming_the_installed_ones(client):
    with pytest.raises(ConfigError, match=r"unknown connector 'nope'; the connectors installed are \['embedded'"):
        deploy_pipeline(client, Pipeline(model="m", inbox="x", connector="nope"))
    with pytest.raises(ConfigError, match="unknown transport 'carrier-pigeon'"):
        InferenceClient(client, inbox="x", transport="carrier-pigeon")


def test_daskinfers_connectors_register_through_the_entry_point_group():
    for name in ("embedded", "redis", "kafka"):
        plugin = load_connector(connector_reference(name))
        assert isinstance(plugin, ConnectorPlugin) and plugin.name == name
    with pytest.raises(ConfigError, match="not a ConnectorPlugin"):
        load_connector("daskinfer.settings:get")


def test_nothing_outside_connectors_knows_a_connector_by_its_name():
    """Adding a connector is one subpackage and one entry-point line: no code outside
    ``daskinfer/connectors/`` compares against a connector's name."""
    root = pathlib.Path(daskinfer.__file__).parent
    names = {"embedded", "redis", "kafka"}
    found = []
    for path in root.rglob("*.py"):
        if "connectors" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                if names & {c for c in consts if isinstance(c, str)}:
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, f"comparisons with a connector's name outside connectors/: {found}"
