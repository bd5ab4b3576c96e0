"""A Python model's code on a worker: unpacked, its requirements installed, its handler imported.

Each model version gets its own folder ``{base}/{name}-{version}-{digest}`` holding
``code/`` (the shipped code directory), ``site/`` (its requirements, installed by pip
with ``--target``) and ``wheels/`` (a shipped wheel folder).  :class:`CodeEnv` counts
the loaded instances that use one folder.

Importing a handler leaves the process as it was: the code folder is on ``sys.path``
only while the handler module is imported, and the modules that came from it are taken
out of ``sys.modules`` afterwards (their previous holders put back).  So two versions of
a model, or two models, each with a ``helpers.py``, run their own; the handler keeps
its siblings through its own globals.  A sibling first imported inside a function, at
call time, is therefore not found: import siblings at the top of the handler module.

Requirements are shared by name in one process, as Python's imports are: the
``site/`` folder goes first on ``sys.path`` while the handler is imported, and stays at
the end of ``sys.path`` (never shadowing the worker's own packages) while an instance
uses it, for packages that import lazily.  A package already imported in the worker
process (by the worker or an earlier version) is the one every model gets.
"""

from __future__ import annotations

import collections
import importlib
import io
import logging
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Sequence
from types import ModuleType

from daskinfer import settings
from daskinfer.exceptions import ModelLoadError

logger = logging.getLogger(__name__)

# sys.path and sys.modules are the process's: one import or install at a time
_lock = threading.RLock()

# pip lines worth a progress log line (the others are details)
_PIP_STEPS = (
    "Looking in",
    "Collecting",
    "Processing",
    "Downloading",
    "Obtaining",
    "Cloning",
    "Building",
    "Installing collected packages",
    "Successfully installed",
    "ERROR",
)

_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*)(?P<password>:[^/@\s]*)?@")
_SECRET_QUERY = re.compile(r"(?i)([?&][\w.-]*(?:token|key|password|passwd|secret|auth|sig)[\w.-]*=)[^&\s#'\"]+")


def redact(text: str) -> str:
    """``text`` with credentials in URLs masked: ``https://user:***@host``, ``https://***@host``
    (a lone user name is often a token), and ``?token=***``-style query values."""

    def userinfo(m: re.Match) -> str:
        if m.group("password"):
            return f"{m.group('scheme')}{m.group('user')}:***@"
        return f"{m.group('scheme')}***@"

    return _SECRET_QUERY.sub(r"\1***", _URL_USERINFO.sub(userinfo, text))


def zip_directory(path: str) -> bytes:
    """The files of ``path`` (without ``__pycache__``, ``.git`` and ``.pyc``) as zip bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", ".git")]
            for f in files:
                if f.endswith(".pyc"):
                    continue
                full = os.path.join(root, f)
                zf.write(full, os.path.relpath(full, path))
    return buf.getvalue()


def prepare(
    root: str,
    *,
    model: str,
    code_zip: bytes | None,
    wheels_zip: bytes | None,
    requirements: Sequence[str],
    pip_options: Sequence[str],
) -> None:
    """Unpack the code and wheels and install the requirements under ``root`` (once per folder)."""
    done = os.path.join(root, ".ready")
    with _lock:
        if os.path.exists(done):
            return
        os.makedirs(root, exist_ok=True)
        if code_zip:
            zipfile.ZipFile(io.BytesIO(code_zip)).extractall(os.path.join(root, "code"))
        if requirements:
            find_links = None
            if wheels_zip:
                find_links = os.path.join(root, "wheels")
                zipfile.ZipFile(io.BytesIO(wheels_zip)).extractall(find_links)
            pip_install(
                os.path.join(root, "site"),
                model=model,
                requirements=requirements,
                pip_options=pip_options,
                find_links=find_links,
            )
        open(done, "w").close()


def pip_install(
    site: str,
    *,
    model: str,
    requirements: Sequence[str],
    pip_options: Sequence[str] = (),
    find_links: str | None = None,
) -> None:
    """Install ``requirements`` into ``site`` with pip, logging its steps with the time since start.

    Credentials in URLs are masked in every log line and error.  Raises
    :class:`ModelLoadError` when pip fails or takes longer than ``models.pip-timeout``.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--no-warn-script-location",
        "--target",
        site,
    ]
    if find_links:
        cmd += ["--no-index", "--find-links", find_links]
    cmd += list(pip_options) + list(requirements)
    timeout = settings.get_seconds("models.pip-timeout")
    shown = redact(str(list(requirements)))
    n = len(requirements)
    logger.info("model %r: installing %d requirement%s with pip: %s", model, n, "" if n == 1 else "s", shown)
    start = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=8)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = redact(line.rstrip())
            if not line.strip():
                continue
            tail.append(line.strip())
            if line.lstrip().startswith(_PIP_STEPS):
                logger.info("model %r: pip [%.1fs] %s", model, time.monotonic() - start, line.strip())
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # pragma: no cover - the reader failed
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - start
    if killed.is_set():
        raise ModelLoadError(f"model {model!r}: installing requirements {shown} took over {timeout:g}s", model=model)
    if code != 0:
        raise ModelLoadError(
            f"model {model!r}: pip could not install requirements {shown}: " + " | ".join(list(tail)[-5:]),
            model=model,
        )
    logger.info("model %r: requirements installed in %.1fs", model, elapsed)


def _top_level_names(code_dir: str) -> set[str]:
    """Names of the modules and packages directly in ``code_dir``."""
    names = set()
    for entry in os.listdir(code_dir):
        full = os.path.join(code_dir, entry)
        if os.path.isdir(full):
            if entry.isidentifier():
                names.add(entry)
        elif entry.endswith((".py", ".pyc", ".so", ".pyd")):
            names.add(entry.split(".", 1)[0])
    return names


def import_isolated(module: str, code_dir: str, site: str | None = None) -> ModuleType:
    """Import ``module`` from ``code_dir`` (and ``site``) and leave ``sys.path``/``sys.modules`` as they were.

    Modules of the same names already imported (another version's) are hidden while it
    imports and put back afterwards; the modules it imported from ``code_dir`` live on
    only through the returned module.
    """
    with _lock:
        names = _top_level_names(code_dir)
        mine = lambda name: name.partition(".")[0] in names  # noqa: E731
        hidden = {name: sys.modules.pop(name) for name in [n for n in sys.modules if mine(n)]}
        added = [code_dir] + ([site] if site else [])
        sys.path[:0] = added
        importlib.invalidate_caches()
        try:
            return importlib.import_module(module)
        finally:
            for p in added:
                if p in sys.path:
                    sys.path.remove(p)
            for name in [n for n in sys.modules if mine(n)]:
                del sys.modules[name]
            sys.modules.update(hidden)


class CodeEnv:
    """One model version's folder in this process, shared by its loaded instances.

    ``acquire`` puts its ``site/`` folder at the end of ``sys.path`` for the first user and
    ``release`` takes it off after the last; handler modules are imported once per folder.
    """

    _envs: dict[str, CodeEnv] = {}

    def __init__(self, root: str):
        self.root = root
        self.code_dir = os.path.join(root, "code")
        site = os.path.join(root, "site")
        self.site: str | None = site if os.path.isdir(site) else None
        self.users = 0
        self._modules: dict[str, ModuleType] = {}

    @classmethod
    def acquire(cls, root: str) -> CodeEnv:
        with _lock:
            env = cls._envs.get(root)
            if env is None:
                env = cls._envs[root] = cls(root)
            env.users += 1
            if env.users == 1 and env.site and env.site not in sys.path:
                sys.path.append(env.site)
            return env

    def release(self) -> None:
        with _lock:
            self.users -= 1
            if self.users > 0:
                return
            self._envs.pop(self.root, None)
            if self.site and self.site in sys.path:
                sys.path.remove(self.site)
            self._modules.clear()

    def handler_module(self, module: str) -> ModuleType:
        """The handler ``module`` of this folder's code, imported once."""
        with _lock:
            mod = self._modules.get(module)
            if mod is None:
                mod = self._modules[module] = import_isolated(module, self.code_dir, self.site)
            return mod
