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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

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

    def line(self) -> str:
        """``✓ name: detail`` or ``✗ name: detail -- fix: ...``."""
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


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as handle:
        return tomllib.load(handle)


def _profile(config: dict, env: Mapping[str, str]) -> tuple[str, dict]:
    """The active profile of a ``.modal.toml``: MODAL_PROFILE, ``active = true``, else the first."""
    wanted = env.get("MODAL_PROFILE")
    if wanted:
        return wanted, config.get(wanted) or {}
    for name, section in config.items():
        if isinstance(section, dict) and section.get("active"):
            return name, section
    for name, section in config.items():
        if isinstance(section, dict):
            return name, section
    return "", {}


def check_modal_credentials(env: Mapping[str, str] | None = None,
                            home: str | os.PathLike | None = None) -> CheckResult:
    """Modal credentials are present (env vars or ``~/.modal.toml``); never contacts Modal.

    Args:
        env: the environment to read (default ``os.environ``).
        home: the home directory holding ``.modal.toml`` (default ``~``);
            ``MODAL_CONFIG_PATH`` in ``env`` overrides the file.
    """
    env = os.environ if env is None else env
    name = "modal credentials"
    if env.get("MODAL_TOKEN_ID") and env.get("MODAL_TOKEN_SECRET"):
        return CheckResult(name, True, "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET are set")
    if env.get("MODAL_TOKEN_ID") or env.get("MODAL_TOKEN_SECRET"):
        half = "MODAL_TOKEN_ID" if env.get("MODAL_TOKEN_ID") else "MODAL_TOKEN_SECRET"
        return CheckResult(name, False, f"only {half} is set", _TOKEN_FIX)
    if env.get("MODAL_OAUTH_REFRESH_TOKEN") and env.get("MODAL_OAUTH_CLIENT_ID"):
        return CheckResult(name, True, "Modal OAuth credentials are set")
    path = Path(env.get("MODAL_CONFIG_PATH") or Path(home or Path.home()) / ".modal.toml")
    if not path.is_file():
        return CheckResult(name, False, f"no MODAL_TOKEN_ID/MODAL_TOKEN_SECRET and no {path}",
                           _TOKEN_FIX)
    try:
        profile, section = _profile(_load_toml(path), env)
    except (OSError, ValueError) as exc:
        return CheckResult(name, False, f"{path} cannot be read: {exc}", _TOKEN_FIX)
    if section.get("token_id") and section.get("token_secret"):
        return CheckResult(name, True, f"profile {profile!r} in {path}")
    return CheckResult(name, False, f"profile {profile or '?'!r} in {path} has no token_id/"
                       "token_secret", _TOKEN_FIX)


def check_imports(closure: ImportClosure, installed: Callable[[str], bool]) -> CheckResult:
    """Every import of the entrypoint resolves: local files exist, third-party ones are installed.

    Args:
        closure: the entrypoint's import closure.
        installed: whether a third-party top-level module is available in the target
            environment (locally: importable; on Modal: in the image's packages).
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
        return CheckResult(name, False, f"{names} not installed in the target environment "
                           f"(imported at {site})", f"add {site.module} to the requirements "
                           f"(--requirements FILE or --pip {site.module}) or install it")
    return CheckResult(name, True, f"{len(closure.files)} local files, "
                       f"{len(closure.third_party)} third-party modules resolved")


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
    from trainguard.checkpoint.manager import human_bytes

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
    """The dataset passes its :class:`~trainguard.data.DataGate` (fresh, non-empty,
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
