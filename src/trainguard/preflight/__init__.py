"""Preflight: fail in seconds, not after hours of paid GPU time.

``run_preflight`` runs the checks that apply to a launch and returns their results; each
prints as ``✓`` or ``✗`` with a one-line fix (``CheckResult.line``). ``require_ok`` turns
any ``✗`` into :class:`~trainguard.errors.PreflightFailed` (exit code 6). The checks:

* modal installed and credentials present, resolved by the client's own configuration
  (Modal backend; never contacts Modal);
* on Modal, relative paths the code uses that exist here but are not shipped (a warning);
* the entrypoint's import closure is complete: a missing local module is named with the
  file and line that imports it; third-party modules are installed in the target
  environment (this machine, or the Modal image's packages);
* the store is writable and commits; free disk for >= 2 checkpoints of the expected size;
* version requirements (``torch==2.2.2``) are met in the target environment;
* a GPU is visible when one was asked for (local backend);
* the dataset passes its :class:`~trainguard.data_manifest.DataGate` (fresh, non-empty, meets its
  requirements), when one is given.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from trainguard.errors import PreflightFailed
from trainguard.preflight.checks import (
    CheckResult,
    canonical_name,
    check_data,
    check_disk,
    check_gpu,
    check_imports,
    check_modal_credentials,
    check_modal_installed,
    check_shipped_paths,
    check_store,
    check_versions,
    installed_version,
    parse_requirement,
)
from trainguard.preflight.imports import ImportClosure, ImportSite, import_closure

__all__ = ["CheckResult", "ImportClosure", "ImportSite", "PreflightFailed", "PreflightTarget",
           "check_data", "check_disk", "check_gpu", "check_imports", "check_modal_credentials",
           "check_modal_installed", "check_shipped_paths", "check_store", "check_versions",
           "distribution_of", "import_closure", "parse_requirement", "require_ok",
           "run_preflight"]


#: Import names whose distribution is named differently (used when not installed here).
_ALIASES = {"sklearn": "scikit-learn", "PIL": "pillow", "cv2": "opencv-python",
            "yaml": "pyyaml", "skimage": "scikit-image", "bs4": "beautifulsoup4",
            "google": "protobuf", "attr": "attrs", "dateutil": "python-dateutil"}


def distribution_of(module: str) -> str:
    """The (normalised) distribution that provides a top-level import name."""
    dists = importlib.metadata.packages_distributions().get(module)
    return canonical_name(dists[0] if dists else _ALIASES.get(module, module))


@dataclass(frozen=True)
class PreflightTarget:
    """Where the job will run, as preflight needs to know it.

    Attributes:
        backend: ``"local"`` or ``"modal"``.
        packages: the Modal image's pip requirements (``"torch==2.2.2"``); unused locally.
        gpu: GPUs asked for (0: none).
        store: the store the run writes (None: not checked).
        disk_path: where checkpoints land on this machine (None: not checked).
        checkpoint_bytes: the expected size of one checkpoint (0: not checked).
        data_gate: a :class:`~trainguard.data_manifest.DataGate` the dataset must pass (None: none).
        shipped: top-level modules the target gets as shipped source rather than as
            packages (on Modal: trainguard itself).
        files: container paths the launch ships (Modal), for the relative-path warning.
    """

    backend: str = "local"
    packages: tuple[str, ...] = ()
    gpu: int = 0
    store: object | None = None
    disk_path: str | None = None
    checkpoint_bytes: int = 0
    data_gate: object | None = None
    shipped: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return "the Modal image" if self.backend == "modal" else "this machine"

    def image_versions(self) -> dict[str, str | None]:
        """Distribution -> exact pinned version in the image (None: listed, not pinned)."""
        pins: dict[str, str | None] = {}
        for text in self.packages:
            dist, spec = parse_requirement(text)
            pins[dist] = spec[2:].strip() if spec.startswith("==") and "," not in spec else None
        return pins

    def installed(self) -> Callable[[str], bool]:
        """Whether a third-party top-level module is available in the target."""
        if self.backend != "modal":
            return lambda module: importlib.util.find_spec(module) is not None
        pins, shipped = self.image_versions(), set(self.shipped)
        return lambda module: module in shipped or distribution_of(module) in pins

    def version_of(self) -> Callable[[str], str | None]:
        """The version of a distribution in the target (None: absent or not pinned)."""
        if self.backend != "modal":
            return installed_version
        pins = self.image_versions()
        return lambda dist: pins.get(canonical_name(dist))


def run_preflight(script: str | os.PathLike, target: PreflightTarget, *,
                  root: str | os.PathLike | None = None, requires: Iterable[str] = (),
                  closure: ImportClosure | None = None,
                  gpu_count: Callable[[], int] | None = None) -> list[CheckResult]:
    """Run every check that applies to launching ``script`` on ``target``.

    Args:
        script: the entrypoint.
        target: where it will run.
        root: the project root for the import analysis (default: the script's directory).
        requires: version requirements such as ``'torch==2.2.2'``, ``'numpy<2'``.
        closure: an already computed import closure (computed here when None).
        gpu_count: visible CUDA devices (default ``torch.cuda.device_count``).

    Returns:
        One result per check, in order.

    Raises:
        ValueError: a requirement cannot be read.
    """
    requires = list(requires)
    for text in requires:
        parse_requirement(text)  # bad input is a usage error, not a failed check
    results = []
    if target.backend == "modal":
        results.append(check_modal_installed())
        results.append(check_modal_credentials())
    closure = closure or import_closure(script, root)
    results.append(check_imports(closure, target.installed(), distribution_of))
    if target.backend == "modal":
        results.append(check_shipped_paths(closure, target.files))
    if target.store is not None:
        results.append(check_store(target.store))
    if target.disk_path and target.checkpoint_bytes:
        results.append(check_disk(target.disk_path, target.checkpoint_bytes))
    if requires:
        results.append(_versions(requires, target))
    if target.gpu and target.backend == "local":
        results.append(check_gpu(target.gpu, gpu_count))
    if target.data_gate is not None:
        results.append(check_data(target.data_gate))
    return results


def _versions(requires: list[str], target: PreflightTarget) -> CheckResult:
    result = check_versions(requires, target.version_of(), target.where)
    if result.ok or target.backend != "modal":
        return result
    pins = target.image_versions()
    for text in requires:  # say "not pinned" rather than "absent" when it is listed
        dist, _spec = parse_requirement(text)
        if dist in pins and pins[dist] is None:
            return CheckResult("versions", False, f"{dist} is in the Modal image but not pinned"
                               f" (required {text})", f"pin it in the requirements: {text!r}")
    return result


def require_ok(results: list[CheckResult]) -> None:
    """Raise :class:`PreflightFailed` naming every failed check (with its fix).

    Raises:
        PreflightFailed: at least one check failed.
    """
    failed = [r for r in results if not r.ok]
    if failed:
        raise PreflightFailed("preflight failed: " + "; ".join(
            f"{r.name}: {r.detail} (fix: {r.fix})" for r in failed))
