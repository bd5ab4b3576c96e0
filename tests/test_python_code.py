"""Python model code: handler modules in a code directory and their requirements, on one worker
(this process).  Each version's code runs its own modules; the process's ``sys.path`` and
``sys.modules`` are left as they were; names that would leave the models directory are refused;
requirements install with progress lines and never log credentials."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import os
import re
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from daskinfer import PythonModel
from daskinfer.exceptions import ConfigError, ModelLoadError

# -- handler directories -----------------------------------------------------------------------


@pytest.fixture
def clean_imports(monkeypatch):
    """Undo what loading a directory model does to ``sys.path`` and ``sys.modules``."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("_daskinfer_handler_", "daskinfer_tinydep", "helpers")):
            del sys.modules[name]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_handler_module_in_a_directory(tmp_path, clean_imports):
    code = tmp_path / "code"
    _write(code / "helpers.py", "OFFSET = 100\n")
    _write(
        code / "handler.py",
        """
        import numpy as np
        from helpers import OFFSET

        def predict(x):
            return x.sum(axis=1) + OFFSET
        """,
    )
    model = PythonModel("handled", directory=code, module="handler", function="predict")
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    np.testing.assert_allclose(model.load(base_dir=str(tmp_path / "work")).predict(x)["output"], [103.0, 112.0])


def test_handler_class_in_a_package_module(tmp_path, clean_imports):
    code = tmp_path / "code"
    _write(code / "pkg" / "__init__.py", "")
    _write(
        code / "pkg" / "serve.py",
        """
        class Model:
            def load(self):
                self.scale = 10

            def predict(self, x):
                return x * self.scale
        """,
    )
    model = PythonModel("pkgmodel", directory=code, module="pkg.serve", function="Model")
    np.testing.assert_allclose(model.load(base_dir=str(tmp_path / "work")).predict(np.ones(3))["output"], [10.0] * 3)


def test_handler_directory_missing_raises_model_load_error(tmp_path):
    path = str(tmp_path / "no-such-dir")
    with pytest.raises(ModelLoadError, match="code directory .* does not exist") as info:
        PythonModel("h", directory=path, module="handler")
    assert path in str(info.value) and info.value.path == path


def test_handler_module_missing_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model 'h': handler module 'handler' not found in") as info:
        PythonModel("h", directory=tmp_path, module="handler")
    assert str(tmp_path) in str(info.value) and info.value.path == str(tmp_path)


def test_handler_function_missing_raises_model_load_error(tmp_path, clean_imports):
    code = tmp_path / "code"
    _write(code / "handler.py", "def other(x):\n    return x\n")
    model = PythonModel("h", directory=code, module="handler", function="predict")
    with pytest.raises(ModelLoadError, match=r"model 'h': handler module .* has no 'predict'") as info:
        model.load(base_dir=str(tmp_path / "work"))
    assert info.value.path.endswith(os.path.join("code", "handler.py"))
    assert info.value.path in str(info.value)


def test_handler_import_error_raises_model_load_error(tmp_path, clean_imports):
    code = tmp_path / "code"
    _write(code / "handler.py", "import daskinfer_module_that_does_not_exist\n\ndef predict(x):\n    return x\n")
    model = PythonModel("h", directory=code, module="handler")
    with pytest.raises(ModelLoadError, match=r"importing handler .* failed: ModuleNotFoundError") as info:
        model.load(base_dir=str(tmp_path / "work"))
    assert info.value.path.endswith("handler.py") and info.value.path in str(info.value)


# -- requirements ------------------------------------------------------------------------------


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_tiny_wheel(folder) -> str:
    """A pure-Python wheel of ``daskinfer_tinydep`` 0.1, made by hand."""
    files = {
        "daskinfer_tinydep/__init__.py": b"def triple(x):\n    return x * 3\n",
        "daskinfer_tinydep-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: daskinfer_tinydep\nVersion: 0.1\n",
        "daskinfer_tinydep-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: daskinfer-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = (
        "\n".join([_record_line(n, d) for n, d in files.items()] + ["daskinfer_tinydep-0.1.dist-info/RECORD,,"]) + "\n"
    )
    files["daskinfer_tinydep-0.1.dist-info/RECORD"] = record.encode()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "daskinfer_tinydep-0.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_requirements_from_a_local_wheel_folder(tmp_path, clean_imports):
    assert importlib.util.find_spec("daskinfer_tinydep") is None  # only the model's own dir will have it
    wheels = tmp_path / "wheels"
    build_tiny_wheel(wheels)
    code = tmp_path / "code"
    _write(
        code / "handler.py",
        """
        import daskinfer_tinydep

        def predict(x):
            return daskinfer_tinydep.triple(x)
        """,
    )
    model = PythonModel("needsdep", directory=code, module="handler", requirements=["daskinfer_tinydep"], wheels=wheels)
    work = tmp_path / "work"
    loaded = model.load(base_dir=str(work))
    np.testing.assert_allclose(loaded.predict(np.arange(4.0))["output"], [0.0, 3.0, 6.0, 9.0])
    # installed into the model's own directory, not into the environment
    installed = list(work.glob("*/site/daskinfer_tinydep/__init__.py"))
    assert len(installed) == 1
    assert sys.modules["daskinfer_tinydep"].__file__ == str(installed[0])
    # its site folder is on sys.path (last: it never shadows the worker's packages) while in use
    site = str(installed[0].parent.parent)
    assert sys.path[-1] == site
    loaded.close()
    assert site not in sys.path


def test_missing_requirement_raises_model_load_error_mentioning_pip(tmp_path, clean_imports):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    model = PythonModel(
        "needsmissing",
        lambda x: x,
        requirements=["daskinfer-no-such-distribution-xyz"],
        wheels=wheels,
    )
    with pytest.raises(ModelLoadError, match=r"model 'needsmissing': pip could not install requirements") as info:
        model.load(base_dir=str(tmp_path / "work"))
    assert "daskinfer-no-such-distribution-xyz" in str(info.value)


def test_missing_wheel_folder_raises_model_load_error(tmp_path):
    path = str(tmp_path / "no-wheels")
    with pytest.raises(ModelLoadError, match="wheel folder .* does not exist") as info:
        PythonModel("x", lambda b: b, requirements=["anything"], wheels=path)
    assert info.value.path == path


# -- each version runs its own code; the process is left as it was ---------------------------------


def _versioned_code(root, offset: int):
    _write(root / "helpers.py", f"OFFSET = {offset}\n")
    _write(root / "pkg" / "__init__.py", "")
    _write(root / "pkg" / "scale.py", f"FACTOR = {offset // 100}\n")
    _write(
        root / "handler.py",
        """
        from helpers import OFFSET
        from pkg import scale

        def predict(x):
            return x * scale.FACTOR + OFFSET
        """,
    )
    return root


def test_two_versions_of_a_directory_model_each_run_their_own_sibling_modules(tmp_path, clean_imports):
    v1 = PythonModel("sib", directory=_versioned_code(tmp_path / "v1", 100), module="handler", version=1)
    v2 = PythonModel("sib", directory=_versioned_code(tmp_path / "v2", 200), module="handler", version=2)
    x = np.arange(3.0)
    work = str(tmp_path / "work")
    first = v1.load(base_dir=work)
    second = v2.load(base_dir=work)  # both loaded at once, as during a version swap
    np.testing.assert_array_equal(first.predict(x)["output"], x * 1 + 100)
    np.testing.assert_array_equal(second.predict(x)["output"], x * 2 + 200)
    # and a third load of version 1 (a worker that joins later) still gets version 1's code
    np.testing.assert_array_equal(v1.load(base_dir=work).predict(x)["output"], x * 1 + 100)


def test_loading_a_directory_model_leaves_sys_path_and_sys_modules_as_they_were(tmp_path, clean_imports):
    code = _versioned_code(tmp_path / "code", 100)
    path_before, modules_before = list(sys.path), set(sys.modules)
    loaded = PythonModel("tidy", directory=code, module="handler").load(base_dir=str(tmp_path / "work"))
    np.testing.assert_array_equal(loaded.predict(np.zeros(2))["output"], [100.0, 100.0])
    assert sys.path == path_before
    leaked = {n for n in set(sys.modules) - modules_before if n.split(".")[0] in ("helpers", "pkg", "handler")}
    assert leaked == set()


def test_a_package_handler_may_import_its_siblings_relatively(tmp_path, clean_imports):
    code = tmp_path / "code"
    _write(code / "pkg" / "__init__.py", "")
    _write(code / "pkg" / "weights.py", "W = 7\n")
    _write(code / "pkg" / "serve.py", "from .weights import W\n\ndef predict(x):\n    return x * W\n")
    model = PythonModel("rel", directory=code, module="pkg.serve")
    np.testing.assert_array_equal(model.load(base_dir=str(tmp_path / "work")).predict(np.ones(2))["output"], [7.0, 7.0])


@pytest.mark.parametrize("field", ["name", "version"])
@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "..", ".hidden", "x\x00y", "a b", ""])
def test_names_and_versions_that_are_not_plain_directory_names_are_refused(field, bad, tmp_path):
    kwargs = {"name": "ok", "version": "1", field: bad}
    with pytest.raises(ConfigError, match=f"model {field} must be") as info:
        PythonModel(kwargs["name"], lambda x: x, version=kwargs["version"])
    assert repr(bad) in str(info.value)


def test_plain_names_and_versions_are_accepted():
    for name, version in [("mlp", "1"), ("clf_v2", "2024-01-31"), ("a.b-c", "1.2.0+cpu"), ("X", 3)]:
        model = PythonModel(name, lambda x: x, version=version)
        assert (model.name, model.version) == (name, str(version))


# -- requirements: progress and no credentials in logs or errors ------------------------------------


def test_requirements_install_logs_progress_with_timings(tmp_path, clean_imports, caplog):
    wheels = tmp_path / "wheels"
    build_tiny_wheel(wheels)
    model = PythonModel("progress", lambda x: x, requirements=["daskinfer_tinydep"], wheels=wheels)
    with caplog.at_level(logging.INFO, logger="daskinfer"):
        model.load(base_dir=str(tmp_path / "work"))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("daskinfer")]
    assert any("model 'progress': installing 1 requirement" in m for m in lines), lines
    assert any(re.search(r"model 'progress': requirements installed in \d+\.\d+s", m) for m in lines), lines
    # pip's own steps, each with the time since the install began
    assert any(re.search(r"model 'progress': pip \[\d+\.\d+s\] .*daskinfer.tinydep", m) for m in lines), lines


def test_credentials_in_requirements_never_reach_logs_or_errors(tmp_path, clean_imports, caplog):
    secret = "s3cr3t-t0ken"
    model = PythonModel(
        "private",
        lambda x: x,
        requirements=[f"privpkg @ https://user:{secret}@127.0.0.1:9/privpkg-1.0-py3-none-any.whl"],
        pip_options=[
            "--retries",
            "0",
            "--timeout",
            "2",
            "--index-url",
            f"https://__token__:{secret}@127.0.0.1:9/simple",
        ],
    )
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ModelLoadError, match="model 'private': pip could not install requirements") as info:
            model.load(base_dir=str(tmp_path / "work"))
    assert secret not in str(info.value)
    assert "https://user:***@127.0.0.1:9/privpkg" in str(info.value)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "privpkg" in logged and secret not in logged
    assert secret not in repr(model)
