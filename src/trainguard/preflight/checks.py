"""The individual preflight checks: each returns a :class:`CheckResult` with a one-line fix.

Every check is a plain function of explicit inputs (environment mapping, home directory,
store, disk-usage function, version lookup), so tests isolate it completely; none of them
needs the network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from trainguard._units import human_bytes
from trainguard.preflight.imports import ImportClosure


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: what was checked ("modal credentials").
        ok: whether it passed.
        detail: what was found (one line).
        fix: the exact fix when it failed (one line; empty when ok).
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False

    def line(self) -> str:
        """``✓ name: detail``, ``! name: detail`` + fix (a warning: the launch goes on),
        or ``✗ name: detail`` + fix."""
        if self.ok and self.warn:
            return f"! {self.name}: {self.detail}\n    fix: {self.fix}"
        if self.ok:
            return f"✓ {self.name}: {self.detail}"
        return f"✗ {self.name}: {self.detail}\n    fix: {self.fix}"


_TOKEN_FIX = ("run `modal token new` (opens the browser; `modal token set --token-id ... "
              "--token-secret ...` only stores a token you already have), or set "
              "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET (CI)")


def check_modal_installed(find_spec: Callable[[str], object] = importlib.util.find_spec
                          ) -> CheckResult:
    """The ``modal`` client library is importable."""
    if find_spec("modal") is None:
        return CheckResult("modal installed", False, "the modal package is not installed",
                           "pip install 'trainguard[modal]' (or pip install modal)")
    try:
        version = importlib.metadata.version("modal")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return CheckResult("modal installed", True, f"modal {version}")


def _token_missing(profile: str, config_path: str) -> str:
    import os as _os

    if _os.environ.get("MODAL_PROFILE"):
        return f"profile {profile!r} has no token in {config_path}"
    return f"no token: neither MODAL_TOKEN_ID/MODAL_TOKEN_SECRET nor a profile in {config_path}"


def check_modal_credentials() -> CheckResult:
    """Modal credentials resolve the way the installed client resolves them (never
    contacts Modal).

    It asks the client's own configuration (``modal.config``): each setting from its
    ``MODAL_*`` variable, else the active profile of ``.modal.toml`` (``MODAL_CONFIG_PATH``,
    ``MODAL_PROFILE``), so a token split between the environment and the file, several
    profiles, and OAuth credentials count exactly as ``modal.Client.from_env`` counts
    them (``modal/client.py``); profile errors are the client's own (``_check_config``).
    The configuration is read when ``modal`` is first imported in this process.
    """
    name = "modal credentials"
    try:
        import modal.config as mc
        from modal.exception import InvalidError
    except ImportError as exc:
        return CheckResult(name, False, f"modal cannot be imported: {exc}",
                           "pip install 'trainguard[modal]'")
    try:
        mc._check_config()
        get = mc.config.get
        token_id, token_secret = get("token_id"), get("token_secret")
        oauth = {k: get(f"oauth_{k}") for k in ("refresh_token", "client_id", "client_secret",
                                                "jwt_key")}
        server = get("server_url")
    except InvalidError as exc:
        return CheckResult(name, False, str(exc).strip().splitlines()[0], _TOKEN_FIX)
    profile, path = getattr(mc, "_profile", "default"), getattr(mc, "user_config_path", "")
    where = "" if server.startswith("https://api.modal.com") else f" (server {server})"
    has_oauth = any(oauth.values())
    if (token_id or token_secret) and has_oauth:
        return CheckResult(name, False, "both a token and OAuth credentials are configured",
                           "keep one kind: unset the MODAL_OAUTH_* or MODAL_TOKEN_* settings")
    if has_oauth:
        complete = oauth["refresh_token"] and oauth["client_id"] and \
            bool(oauth["client_secret"]) != bool(oauth["jwt_key"])
        if not complete:
            return CheckResult(name, False, "OAuth credentials are incomplete (a refresh token, "
                               "a client id, and one of client secret or JWT key)", _TOKEN_FIX)
        return CheckResult(name, True, f"OAuth credentials{where}")
    if token_id and token_secret:
        source = ("MODAL_TOKEN_ID/MODAL_TOKEN_SECRET" if os.environ.get("MODAL_TOKEN_ID")
                  and os.environ.get("MODAL_TOKEN_SECRET") else f"profile {profile!r} in {path}")
        return CheckResult(name, True, f"token from {source}{where}")
    if token_id or token_secret:
        half = "token_id" if token_id else "token_secret"
        return CheckResult(name, False, f"only {half} is set (environment or profile "
                           f"{profile!r} in {path})", _TOKEN_FIX)
    return CheckResult(name, False, _token_missing(profile, path), _TOKEN_FIX)


def check_imports(closure: ImportClosure, installed: Callable[[str], bool],
                  pip_name: Callable[[str], str] = lambda module: module) -> CheckResult:
    """Every import of the entrypoint resolves: local files exist, third-party ones are installed.

    Args:
        closure: the entrypoint's import closure.
        installed: whether a third-party top-level module is available in the target
            environment (locally: importable; on Modal: in the image's packages).
        pip_name: the distribution to install for an import name (``sklearn`` ->
            ``scikit-learn``), for the fix.
    """
    name = "imports"
    if closure.missing:
        site = closure.missing[0]
        more = f" (and {len(closure.missing) - 1} more)" if len(closure.missing) > 1 else ""
        return CheckResult(name, False, f"module {site.module} imported at {site} does not "
                           f"exist{more}", f"create {site.module.replace('.', '/')}.py or fix "
                           f"the import at {site}")
    absent = [s for m, s in closure.third_party.items() if not s.optional and not installed(m)]
    if absent:
        site = absent[0]
        names = ", ".join(s.module for s in absent)
        dists = " ".join(dict.fromkeys(pip_name(s.module) for s in absent))
        pips = " ".join(f"--pip {d}" for d in dists.split())
        return CheckResult(name, False, f"{names} not installed in the target environment "
                           f"(imported at {site})", f"add {dists} to the requirements "
                           f"(--requirements FILE or {pips}) or install it")
    return CheckResult(name, True, f"{len(closure.files)} local files, "
                       f"{len(closure.third_party)} third-party modules resolved")


#: Calls whose string arguments are not paths the script reads.
_NOT_PATHS = {"print", "getenv", "get", "setdefault", "format", "join", "split", "startswith",
              "endswith", "replace", "add_argument_group", "warn", "info", "debug", "error",
              "warning", "log", "import_module", "getLogger"}


def _path_literals(source: Path) -> list[tuple[str, int]]:
    """String literals passed to calls in ``source`` (candidates for files it opens)."""
    import ast

    try:
        tree = ast.parse(source.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        if called in _NOT_PATHS:
            continue
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and 0 < len(
                    arg.value) < 256 and "\n" not in arg.value and not arg.value.startswith(
                    ("/", "~", "-", "http:", "https:", "s3:", "gs:", "modal:")):
                found.append((arg.value, node.lineno))
    return found


def check_shipped_paths(closure: ImportClosure, shipped: Iterable[str],
                        remote_root: str = "/root") -> CheckResult:
    """Warn about relative paths the script's code passes to calls (``open("cfg.yaml")``,
    ``read_csv("data/x.csv")``, ``default="configs/a.json"``) that exist next to the
    script or in the project root but are not shipped: in the container (working
    directory ``/root``) they would not exist.

    Args:
        closure: the entrypoint's import closure (its local source files are read).
        shipped: container paths the launch ships.
        remote_root: the container directory the project lands in.
    """
    name = "local files"
    shipped = set(shipped)
    roots = [Path(closure.root), Path(closure.script).parent]
    missing: dict[str, str] = {}
    for source in closure.files:
        for text, line in _path_literals(Path(source)):
            rel = text.strip().removeprefix("./").rstrip("/")
            if not rel or rel in (".", "..") or rel.startswith("../") or rel.endswith(".py"):
                continue
            if not any((root / rel).exists() for root in roots):
                continue
            remote = f"{remote_root}/{rel}"
            if remote in shipped or any(p.startswith(remote + "/") for p in shipped):
                continue
            where = os.path.relpath(source, closure.root) if source.startswith(
                closure.root) else source
            missing.setdefault(rel, (f"{where}:{line}", source, line))
    missing = {rel: loc for rel, (loc, *_order) in sorted(missing.items(),
                                                          key=lambda kv: kv[1][1:])}
    if not missing:
        return CheckResult(name, True, "no unshipped relative paths found in the code")
    shown = ", ".join(f"{path} ({where})" for path, where in list(missing.items())[:4])
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    adds = " ".join(f"--add-local {p}" for p in missing)
    return CheckResult(name, True, f"{shown}{more} exist here but are not shipped; in the "
                       f"container they will be missing", f"ship them: {adds}", warn=True)


def check_store(store, probe: str = ".trainguard-preflight") -> CheckResult:
    """The store accepts a write, commits, reads it back, and deletes it."""
    name = "store writable"
    payload = f"preflight {time.time()}".encode()
    try:
        store.write(probe, payload)
        store.commit()
        back = bytes(store.read(probe))
        store.delete(probe)
        store.commit()
    except Exception as exc:  # any failure here is the finding
        return CheckResult(name, False, f"{store.url}: {exc}",
                           "point --run-dir/--volume at a writable place, or fix its permissions")
    if back != payload:
        return CheckResult(name, False, f"{store.url}: read back differs from what was written",
                           "the storage is not consistent; use another directory or volume")
    return CheckResult(name, True, f"{store.url} writes, commits and reads back")


def check_disk(path: str | os.PathLike, checkpoint_bytes: int, count: int = 2,
               usage: Callable[[str], object] = shutil.disk_usage) -> CheckResult:
    """Free space at ``path`` holds ``count`` checkpoints of ``checkpoint_bytes`` each."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = usage(str(probe)).free
    need = checkpoint_bytes * count
    detail = f"{human_bytes(free)} free at {probe}, {count} checkpoints need {human_bytes(need)}"
    if free < need:
        return CheckResult("disk space", False, detail,
                           "free space, keep fewer checkpoints (keep_last), or use another disk")
    return CheckResult("disk space", True, detail)


_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def parse_requirement(text: str) -> tuple[str, str]:
    """``'numpy<2'`` -> ``('numpy', '<2')``.

    Raises:
        ValueError: not ``NAME`` followed by optional version specifiers.
    """
    match = _REQ.match(text.split(";")[0])
    if not match:
        raise ValueError(f"cannot read requirement {text!r}; use e.g. 'torch==2.2.2' or 'numpy<2'")
    spec = match.group(3).strip()
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        SpecifierSet(spec)
    except InvalidSpecifier:
        raise ValueError(f"cannot read requirement {text!r}; use e.g. 'torch==2.2.2' or "
                         f"'numpy<2'") from None
    return canonical_name(match.group(1)), spec


def canonical_name(name: str) -> str:
    """The normalised distribution name (PEP 503): ``Scikit_Learn`` -> ``scikit-learn``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def check_versions(requires: Iterable[str], version_of: Callable[[str], str | None],
                   where: str) -> CheckResult:
    """Each ``NAME SPEC`` requirement is met by the version in the target environment.

    Args:
        requires: requirements such as ``'torch==2.2.2'``.
        version_of: the installed (or pinned) version of a distribution, None if absent.
        where: the target environment in words ("this machine", "the Modal image").
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    requires = list(requires)
    for text in requires:
        dist, spec = parse_requirement(text)
        version = version_of(dist)
        if version is None:
            return CheckResult("versions", False, f"{dist} is not in {where} (required {text})",
                               f"install {text!r} in {where}")
        try:
            ok = SpecifierSet(spec).contains(Version(version), prereleases=True) if spec else True
        except InvalidVersion:
            ok = False
        if not ok:
            return CheckResult("versions", False, f"{dist} {version} in {where} does not "
                               f"satisfy {text!r}", f"pin {text!r} in the requirements of {where}")
    return CheckResult("versions", True, f"{len(requires)} requirements met in {where}"
                       if requires else "no version requirements given")


def installed_version(dist: str) -> str | None:
    """The version of an installed distribution on this machine (None if absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_gpu(count: int = 1, device_count: Callable[[], int] | None = None) -> CheckResult:
    """At least ``count`` CUDA devices are visible on this machine."""
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count
    seen = device_count()
    if seen < count:
        return CheckResult("gpu", False, f"{seen} CUDA devices visible, {count} asked for",
                           "check CUDA_VISIBLE_DEVICES and `nvidia-smi`, or drop --gpu")
    return CheckResult("gpu", True, f"{seen} CUDA devices visible")


def python_tag() -> str:
    """``"3.11"`` for the running interpreter."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def check_data(gate) -> CheckResult:
    """The dataset passes its :class:`~trainguard.data_manifest.DataGate` (fresh, non-empty,
    requirements met); a stale manifest is rebuilt first, as the Run would."""
    from trainguard.errors import DataGateFailed

    try:
        manifest = gate.check(log=lambda message: None)
    except DataGateFailed as exc:
        return CheckResult("data", False, str(exc),
                           f"fix the dataset in {gate.root} (or the requirement), then "
                           f"`trainguard data check {gate.root}`")
    totals = manifest.totals
    shown = ", ".join(f"{k}={v:g}" for k, v in sorted(totals.items()))
    return CheckResult("data", True, f"{gate.root}: {shown}")
