"""The Modal backend: the same job on Modal GPUs, built offline from a :class:`JobSpec`.

``build_plan`` resolves everything a launch needs without contacting Modal: the files to
ship (the script and every local module it imports, transitively, found by static
analysis; nothing from site-packages), the image's packages, the volume and its mount
path, ``modal.Retries``, the timeout and the GPU request, each validated against Modal's
limits with an error that states the limit. ``build_app`` turns a plan into real Modal
objects (``modal.App``, ``modal.Image``, ``modal.Volume.from_name``, ``modal.Retries``);
building them is lazy and offline, only ``.run()``/``spawn`` (in ``modal_jobs``) talk to
Modal. ``--dry-run`` prints :meth:`ModalPlan.to_dict`.

Modal limits (checked here): per-attempt timeout 10 s..24 h; ``modal.Retries``:
``max_retries`` 0..10, ``initial_delay`` 0..60 s, ``backoff_coefficient`` 1..10,
``max_delay`` 1..60 s; GPUs ``TYPE[:N]`` with N up to 8 (A10/A10G up to 4), or a
fallback list in order of preference.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trainguard
from trainguard.launch.spec import JobSpec, format_duration
from trainguard.preflight import ImportClosure, import_closure

#: Where the volume is mounted in the container; run dirs live under it.
MOUNT_PATH = "/trainguard"
#: Where shipped sources go (on ``PYTHONPATH`` in Modal containers).
REMOTE_ROOT = "/root"
MIN_TIMEOUT, MAX_TIMEOUT = 10, 24 * 3600
MAX_RETRIES, MAX_RETRY_DELAY, MAX_BACKOFF = 10, 60.0, 10.0
GPU_TYPES = {"T4": 8, "L4": 8, "A10": 4, "A10G": 4, "L40S": 8, "A100": 8, "A100-40GB": 8,
             "A100-80GB": 8, "RTX-PRO-6000": 8, "H100": 8, "H100!": 8, "H200": 8, "B200": 8,
             "B200+": 8, "ANY": 8}
#: What trainguard itself needs in the image (the user's pins take precedence).
RUNTIME_PACKAGES = ("torch", "safetensors", "numpy", "xxhash", "click")
_IGNORE_PARTS = {"__pycache__", ".git", ".ipynb_checkpoints"}


class ModalConfigError(ValueError):
    """A Modal option is outside Modal's limits (the message states the limit)."""


def validate_gpu(text: str | None) -> str | list[str] | None:
    """``"h100:8"`` -> ``"H100:8"``; ``"H100:8,A100-80GB:8"`` -> a fallback list.

    Raises:
        ModalConfigError: an unknown type, or a count outside 1..8 (1..4 for A10).
    """
    if text is None or not str(text).strip():
        return None
    choices = [c.strip() for c in str(text).split(",") if c.strip()]
    out = []
    for choice in choices:
        kind, sep, count_text = choice.partition(":")
        kind = kind.upper()
        if kind not in GPU_TYPES:
            raise ModalConfigError(f"unknown Modal GPU type {kind!r} in --gpu {text!r}; use one "
                                   f"of {', '.join(sorted(GPU_TYPES))}, optionally :N "
                                   f"(e.g. H100:8), or a fallback list H100,A100-80GB")
        if sep and not re.fullmatch(r"\d+", count_text):
            raise ModalConfigError(f"GPU count {count_text!r} in --gpu {text!r} is not a whole "
                                   f"number; use e.g. {kind}:2")
        count, limit = int(count_text) if sep else 1, GPU_TYPES[kind]
        if not 1 <= count <= limit:
            raise ModalConfigError(f"--gpu {choice}: Modal allows 1 to {limit} {kind} GPUs per "
                                   f"container; use {kind}:{min(max(count, 1), limit)}")
        out.append(f"{kind}:{count}" if sep else kind)
    return out[0] if len(out) == 1 else out


def gpu_count(gpu: str | list[str] | None) -> int:
    """GPUs per container of a validated request (the first choice of a fallback list)."""
    if not gpu:
        return 0
    first = gpu[0] if isinstance(gpu, list) else gpu
    return int(first.partition(":")[2] or 1)


def validate_timeout(seconds: float | None) -> int:
    """A per-attempt timeout in whole seconds within Modal's 10 s..24 h (default 24 h).

    Raises:
        ModalConfigError: outside Modal's limits.
    """
    if seconds is None:
        return MAX_TIMEOUT
    if not MIN_TIMEOUT <= seconds <= MAX_TIMEOUT:
        raise ModalConfigError(f"--timeout {format_duration(seconds)}: Modal allows 10s to 24h "
                               f"per attempt; use at most 24h (the run resumes from its last "
                               f"commit on the next attempt)")
    return int(seconds)


def validate_retries(retries: int, delay: float, backoff: float, max_delay: float) -> dict:
    """The ``modal.Retries`` arguments for a retry policy, within Modal's limits.

    Raises:
        ModalConfigError: outside Modal's limits (the message names the limit).
    """
    if not 0 <= retries <= MAX_RETRIES:
        raise ModalConfigError(f"--retries {retries}: Modal allows 0 to {MAX_RETRIES} retries")
    if not 0 <= delay <= MAX_RETRY_DELAY:
        raise ModalConfigError(f"--retry-delay {delay:g}s: Modal allows 0 to 60 s before the "
                               f"first retry")
    if not 1 <= backoff <= MAX_BACKOFF:
        raise ModalConfigError(f"--backoff {backoff:g}: Modal allows a backoff coefficient "
                               f"between 1 and 10")
    if not 1 <= max_delay <= MAX_RETRY_DELAY:
        raise ModalConfigError(f"--max-delay {max_delay:g}s: Modal allows 1 to 60 s between "
                               f"retries")
    return {"max_retries": retries, "initial_delay": float(delay),
            "backoff_coefficient": float(backoff), "max_delay": float(max_delay)}


@dataclass(frozen=True)
class ModalOptions:
    """What the Modal backend adds to a :class:`JobSpec`.

    Attributes:
        volume: the ``modal.Volume`` name (created when missing).
        gpu: ``"H100"``, ``"H100:8"``, ``"H100:8,A100-80GB:8"`` or None.
        cpu: CPU cores requested (None: Modal's default).
        memory: memory requested in MiB (None: Modal's default).
        packages: pip requirements for the image (``"torch==2.2.2"``).
        requirements_file: a requirements.txt whose lines are added to ``packages``.
        python_version: the image's Python (default: this interpreter's, which a
            serialized function needs).
        root: the project root for the import analysis (default: the script's dir).
        app_name: the Modal app name (default ``trainguard-<job name>``).
    """

    volume: str
    gpu: str | list[str] | None = None
    cpu: float | None = None
    memory: int | None = None
    packages: tuple[str, ...] = ()
    requirements_file: str | None = None
    python_version: str = ""
    root: str = ""
    app_name: str = ""

    def __post_init__(self) -> None:
        if not self.volume or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.volume):
            raise ModalConfigError(f"volume name {self.volume!r}: use 1-64 letters, digits, "
                                   f"'.', '-' or '_' (e.g. --volume my-runs)")
        set_ = object.__setattr__
        set_(self, "gpu", validate_gpu(",".join(self.gpu) if isinstance(self.gpu, list)
                                       else self.gpu))
        set_(self, "python_version", self.python_version or trainguard_python())
        if self.cpu is not None and not self.cpu > 0:
            raise ModalConfigError(f"--cpu {self.cpu}: use a positive number of cores")
        if self.memory is not None and not self.memory > 0:
            raise ModalConfigError(f"--memory {self.memory}: use a positive number of MiB")
        set_(self, "packages", tuple(self.packages) + read_requirements(self.requirements_file))


def trainguard_python() -> str:
    """``"3.11"``: the image's Python must match the client's for serialized functions."""
    import sys

    return f"{sys.version_info.major}.{sys.version_info.minor}"


def read_requirements(path: str | None) -> tuple[str, ...]:
    """The requirement lines of a requirements.txt (comments and options dropped)."""
    if not path:
        return ()
    lines = Path(path).read_text().splitlines()
    return tuple(s for s in (line.split("#")[0].strip() for line in lines)
                 if s and not s.startswith("-"))


@dataclass
class ModalPlan:
    """A resolved Modal launch: everything ``build_app`` needs, as plain data.

    ``files`` maps each shipped local path to its path in the container; ``missing``
    lists imports that resolve to nothing (preflight refuses such a launch).
    """

    job: dict
    app_name: str
    python_version: str
    packages: list[str]
    files: dict[str, str]
    local_modules: dict[str, str]
    third_party: list[str]
    missing: list[str]
    runtime: dict[str, str]
    volume: str
    mount_path: str
    run_dir: str
    retries: dict
    timeout: int
    gpu: str | list[str] | None
    cpu: float | None
    memory: int | None
    closure: ImportClosure | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """The plan as JSON-ready data (``--dry-run --json``)."""
        out = asdict(self)
        out.pop("closure")
        return out


def _sources(directory: Path) -> list[Path]:
    """Files of a local package to ship: everything but caches and hidden files."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and not (
        set(p.relative_to(directory).parts) & _IGNORE_PARTS
        or any(part.startswith(".") for part in p.relative_to(directory).parts)
        or p.suffix in (".pyc", ".pyo")))


def shipped_files(closure: ImportClosure) -> dict[str, str]:
    """Local path -> container path for the script and every local module."""
    files = {closure.script: f"{REMOTE_ROOT}/{Path(closure.script).name}"}
    for name, path in closure.local.items():
        local = Path(path)
        if local.is_dir():
            for item in _sources(local):
                files[str(item)] = f"{REMOTE_ROOT}/{name}/{item.relative_to(local).as_posix()}"
        else:
            files[str(local)] = f"{REMOTE_ROOT}/{local.name}"
    return dict(sorted(files.items()))


def image_packages(options: ModalOptions) -> list[str]:
    """The image's pip requirements: the user's, plus trainguard's own needs unpinned."""
    from trainguard.preflight import parse_requirement

    named = {parse_requirement(p)[0] for p in options.packages}
    return list(options.packages) + [p for p in RUNTIME_PACKAGES if p not in named]


def build_plan(spec: JobSpec, options: ModalOptions, closure: ImportClosure | None = None
               ) -> ModalPlan:
    """Resolve a Modal launch of ``spec`` without contacting Modal.

    Raises:
        ModalConfigError: the timeout, retries or GPU are outside Modal's limits.
    """
    retries = validate_retries(spec.retry.retries, spec.retry.delay, spec.retry.backoff,
                               spec.retry.max_delay)
    timeout = validate_timeout(spec.timeout)
    closure = closure or import_closure(spec.script, options.root or None)
    run_dir = f"{MOUNT_PATH}/{spec.name}"
    job = {"script": f"{REMOTE_ROOT}/{Path(spec.script).name}", "args": list(spec.args),
           "run_dir": run_dir, "volume": options.volume, "mount_path": MOUNT_PATH,
           "timeout": timeout, "env": dict(spec.env)}
    package_dir = Path(trainguard.__file__).parent
    return ModalPlan(
        job=job, app_name=options.app_name or f"trainguard-{spec.name}",
        python_version=options.python_version, packages=image_packages(options),
        files=shipped_files(closure), local_modules=dict(closure.local),
        third_party=sorted(closure.third_party), runtime={str(package_dir):
                                                          f"{REMOTE_ROOT}/trainguard"},
        missing=[f"{s.module} ({s})" for s in closure.missing], volume=options.volume,
        mount_path=MOUNT_PATH, run_dir=run_dir, retries=retries, timeout=timeout,
        gpu=options.gpu, cpu=options.cpu, memory=options.memory, closure=closure)


def _ignore(path: Path) -> bool:
    return bool(set(path.parts) & _IGNORE_PARTS) or path.suffix in (".pyc", ".pyo") or any(
        p.startswith(".") for p in path.parts)


def build_image(plan: ModalPlan):
    """The ``modal.Image``: debian_slim + packages (uv) + trainguard + the shipped sources."""
    import modal

    image = modal.Image.debian_slim(python_version=plan.python_version)
    if plan.packages:
        image = image.uv_pip_install(*plan.packages)
    image = image.env({"PYTHONUNBUFFERED": "1"})
    for local, remote in plan.runtime.items():
        image = image.add_local_dir(local, remote, ignore=_ignore)
    script = plan.closure.script if plan.closure else None
    if script:
        image = image.add_local_file(script, plan.files[script])
    for name, path in plan.local_modules.items():
        if Path(path).is_dir():
            image = image.add_local_dir(path, f"{REMOTE_ROOT}/{name}", ignore=_ignore)
        else:
            image = image.add_local_file(path, f"{REMOTE_ROOT}/{Path(path).name}")
    return image


def build_app(plan: ModalPlan):
    """A real ``modal.App`` with one function running the job (offline; nothing is sent).

    Returns:
        ``(app, function)``: call ``function.spawn(plan.job)`` inside ``app.run()``.
    """
    import modal

    from trainguard.launch.modal_entry import run_job

    app = modal.App(plan.app_name)
    volume = modal.Volume.from_name(plan.volume, create_if_missing=True)
    function = app.function(
        image=build_image(plan), gpu=plan.gpu, cpu=plan.cpu, memory=plan.memory,
        volumes={plan.mount_path: volume}, retries=modal.Retries(**plan.retries),
        timeout=plan.timeout, serialized=True, name="trainguard_job")(run_job)
    return app, function


def describe(plan: ModalPlan) -> str:
    """The plan in words (``--dry-run``)."""
    lines = [f"app       {plan.app_name} (python {plan.python_version})",
             f"gpu       {plan.gpu or 'none'}  cpu {plan.cpu or 'default'}  "
             f"memory {plan.memory or 'default'} MiB",
             f"timeout   {format_duration(plan.timeout)} per attempt",
             f"retries   {plan.retries['max_retries']} (first after "
             f"{plan.retries['initial_delay']:g}s, x{plan.retries['backoff_coefficient']:g}, "
             f"at most {plan.retries['max_delay']:g}s); preemptions restart the input",
             f"volume    {plan.volume} mounted at {plan.mount_path}; run dir {plan.run_dir}",
             f"packages  {' '.join(plan.packages) or '-'}",
             f"files     {len(plan.files)} shipped ({', '.join(plan.local_modules) or 'no'} "
             f"local modules; nothing from site-packages):"]
    lines += [f"  {local} -> {remote}" for local, remote in plan.files.items()]
    if plan.missing:
        lines.append("missing   " + "; ".join(plan.missing))
    return "\n".join(lines)

