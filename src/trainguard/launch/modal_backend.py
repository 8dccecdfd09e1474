"""The Modal backend: the same job on Modal GPUs, built offline from a :class:`JobSpec`.

``build_plan`` resolves everything a launch needs without contacting Modal: the files to
ship (the script and every local module it imports, transitively, found by static
analysis; nothing from site-packages), the image's packages, the volume and its mount
path, ``modal.Retries``, the timeout and the GPU request, each validated against Modal's
limits with an error that states the limit. ``build_app`` turns a plan into real Modal
objects (``modal.App``, ``modal.Image``, ``modal.Volume.from_name``, ``modal.Retries``);
building them is lazy and offline, only ``.run()``/``spawn`` (in ``modal_jobs``) talk to
Modal. ``--dry-run`` prints :meth:`ModalPlan.to_dict`.

Several processes: a ``JobSpec.torchrun`` makes the container run the script through
``torch.distributed.run`` (``--standalone``, one worker per GPU by default), and
``ModalOptions.nnodes`` > 1 makes the function a Modal cluster (``modal.clustered``)
of that many containers, each running torchrun with its cluster rank as node rank.

Each attempt runs in a fresh container (``single_use_containers=True``, or
``max_inputs=1`` on a modal that predates it): a retry never inherits a poisoned
process, its CUDA memory or an orphaned torchrun. ``--env`` values and ``--secret``
names travel as ``modal.Secret`` objects, never in the function's input, and plans print
only their names.

Modal limits (checked here): per-attempt timeout 10 s..24 h; ``modal.Retries``:
``max_retries`` 0..10, ``initial_delay`` 0..60 s, ``backoff_coefficient`` 1..10,
``max_delay`` 1..60 s; GPUs ``TYPE[:N]`` with N up to 8 (A10/A10G up to 4), or a
fallback list in order of preference; ``--nproc-per-node`` at most the GPUs of each
container; a cluster takes every GPU of each node (``TYPE:8``; ``modal.clustered``).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import trainguard
from trainguard._units import human_duration
from trainguard.errors import ModalConfigError
from trainguard.launch.modal_entry import torchrun_argv
from trainguard.launch.spec import JobSpec
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
#: Port of rank 0's static rendezvous on a Modal cluster.
MASTER_PORT = 29500
#: What trainguard itself needs in the image when its metadata cannot be read (the
#: user's pins take precedence; normally :func:`runtime_requirements` reads them).
RUNTIME_PACKAGES = ("torch>=2.4", "safetensors>=0.4", "numpy>=1.24", "xxhash>=3.4",
                    "click>=8.1", "packaging>=23")
#: Modules the image gets as shipped source rather than as packages.
SHIPPED_RUNTIME = ("trainguard",)
_IGNORE_PARTS = {"__pycache__", ".git", ".ipynb_checkpoints"}


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


def _choices(gpu: str | list[str] | None) -> list[str]:
    return [] if not gpu else gpu if isinstance(gpu, list) else [gpu]


def guaranteed_gpus(gpu: str | list[str] | None) -> int:
    """GPUs every container gets whichever choice of a fallback list Modal picks."""
    return min((int(c.partition(":")[2] or 1) for c in _choices(gpu)), default=0)


def _gpu_text(gpu: str | list[str] | None) -> str:
    return ",".join(_choices(gpu))


def validate_timeout(seconds: float | None) -> int:
    """A per-attempt timeout in whole seconds within Modal's 10 s..24 h (default 24 h).

    Raises:
        ModalConfigError: outside Modal's limits.
    """
    if seconds is None:
        return MAX_TIMEOUT
    if not MIN_TIMEOUT <= seconds <= MAX_TIMEOUT:
        raise ModalConfigError(f"--timeout {human_duration(seconds)}: Modal allows 10s to 24h "
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
        nnodes: containers of a Modal cluster (``modal.clustered(size=nnodes)``); 1: no
            cluster. Each container takes every GPU of its node (``--gpu H100:8``).
        rdma: ask Modal for RDMA networking between the cluster's nodes.
        add_local: files or directories the script reads (configs, CSVs, tokenizers), as
            ``PATH`` or ``PATH:REMOTE``; shipped to ``/root/<PATH relative to the project
            root>`` (or REMOTE, relative to ``/root`` unless absolute).
        secrets: names of ``modal.Secret`` objects whose keys become environment variables
            of the container (``modal secret create NAME KEY=VALUE``).
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
    nnodes: int = 1
    rdma: bool = False
    add_local: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()

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
        for name in self.secrets:
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name or ""):
                raise ModalConfigError(f"--secret {name!r}: a Modal secret name has 1-64 letters,"
                                       f" digits, '.', '-' or '_' (create one with `modal "
                                       f"secret create NAME KEY=VALUE`)")
        set_(self, "add_local", tuple(self.add_local))
        set_(self, "secrets", tuple(self.secrets))
        self._check_cluster()

    def _check_cluster(self) -> None:
        if not isinstance(self.nnodes, int) or isinstance(self.nnodes, bool) or self.nnodes < 1:
            raise ModalConfigError(f"--nnodes {self.nnodes!r}: use a whole number of nodes >= 1")
        if self.rdma and self.nnodes == 1:
            raise ModalConfigError("--rdma is for clusters: use it with --nnodes 2 or more")
        if self.nnodes == 1:
            return
        if not self.gpu:
            raise ModalConfigError(f"--nnodes {self.nnodes} needs GPUs: a Modal cluster takes "
                                   f"every GPU of each node, e.g. --gpu H100:8")
        for choice in _choices(self.gpu):
            kind, _, count = choice.partition(":")
            if int(count or 1) != GPU_TYPES[kind]:
                raise ModalConfigError(f"--nnodes {self.nnodes} with --gpu {choice}: a Modal "
                                       f"cluster takes every GPU of each node; use --gpu "
                                       f"{kind}:{GPU_TYPES[kind]}")


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


def modal_torchrun(options: ModalOptions, nproc_per_node: int | None,
                   max_restarts: int = 0) -> dict | None:
    """The ``JobSpec.torchrun`` of a Modal launch (what ``--nproc-per-node`` maps onto).

    torchrun is used when ``nproc_per_node`` is given or ``options`` ask for a cluster;
    without ``nproc_per_node`` it starts one worker per GPU of each container.

    Returns:
        None (the script runs as one process), or ``{"nproc_per_node", "max_restarts"}``.

    Raises:
        ModalConfigError: more workers than GPUs, or workers without GPUs.
    """
    if nproc_per_node is None and options.nnodes == 1:
        return None
    torchrun = {"nproc_per_node": nproc_per_node or guaranteed_gpus(options.gpu),
                "max_restarts": max_restarts}
    check_torchrun(torchrun, options)
    return torchrun


def check_torchrun(torchrun: dict | None, options: ModalOptions) -> None:
    """Check a ``JobSpec.torchrun`` against the Modal resources it will run on.

    Raises:
        ModalConfigError: the message names the flags and the fix.
    """
    if torchrun is None:
        if options.nnodes > 1:
            raise ModalConfigError(f"--nnodes {options.nnodes} runs torchrun on every node: "
                                   f"set --nproc-per-node (JobSpec.torchrun)")
        return
    if str(torchrun.get("nnodes", "1")) != "1" or torchrun.get("rdzv_endpoint"):
        raise ModalConfigError("on Modal the node count is --nnodes (ModalOptions.nnodes) and "
                               "the cluster finds rank 0 itself: leave JobSpec.torchrun's "
                               "nnodes and rdzv_endpoint unset")
    nproc, gpus = torchrun["nproc_per_node"], guaranteed_gpus(options.gpu)
    if not gpus:
        raise ModalConfigError(f"--nproc-per-node {nproc} on Modal needs GPUs, one per "
                               f"process: add --gpu H100:{min(max(nproc, 1), 8)}")
    if nproc > gpus:
        raise ModalConfigError(f"--nproc-per-node {nproc} is more than the {gpus} GPUs per "
                               f"container of --gpu {_gpu_text(options.gpu)}; use "
                               f"--nproc-per-node {gpus} or fewer (one process per GPU)")


def _clustered(size: int):
    """``modal.clustered``, or ``modal.experimental.clustered`` on an older modal.

    Raises:
        ModalConfigError: the installed modal has neither.
    """
    import importlib

    import modal

    clustered = getattr(modal, "clustered", None)
    if clustered is None:
        clustered = getattr(importlib.import_module("modal.experimental"), "clustered", None)
    if clustered is None:
        raise ModalConfigError(f"--nnodes {size}: the installed modal "
                               f"{getattr(modal, '__version__', '?')} has no clustered "
                               f"functions (modal.clustered); pip install -U modal")
    return clustered


def clustered_decorator(size: int, rdma: bool):
    """``modal.clustered(size=size, rdma=rdma)``: a function run by a cluster of ``size``
    containers (``modal.experimental.clustered`` on modal versions before it was public).

    Raises:
        ModalConfigError: the installed modal has no clustered functions.
    """
    return _clustered(size)(size=size, rdma=rdma)


@dataclass
class ModalPlan:
    """A resolved Modal launch: everything ``build_app`` needs, as plain data.

    ``files`` maps each shipped local path to its path in the container; ``missing``
    lists imports that resolve to nothing (preflight refuses such a launch).
    ``command`` is the torchrun command of node 0 (None: the script runs in the
    function's process); on a cluster, rank 0's address is known only in the container.
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
    nproc_per_node: int | None = None
    nnodes: int = 1
    clustered: bool = False
    rdma: bool = False
    command: list[str] | None = None
    single_use_containers: bool = True
    secrets: list[str] = field(default_factory=list)
    env_keys: list[str] = field(default_factory=list)
    added: dict[str, str] = field(default_factory=dict)
    closure: ImportClosure | None = field(default=None, repr=False)
    #: ``--env`` values: shipped as a ``modal.Secret``, never printed nor in ``job``.
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """The plan as JSON-ready data (``--dry-run --json``); ``--env`` values masked."""
        out = asdict(self)
        out.pop("closure")
        out["env"] = dict.fromkeys(self.env, "***")
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


def runtime_requirements(python_version: str) -> tuple[str, ...]:
    """trainguard's own requirements for an image of ``python_version``, read from its
    installed metadata (markers evaluated, extras left out)."""
    import importlib.metadata

    from packaging.requirements import InvalidRequirement, Requirement

    try:
        lines = importlib.metadata.requires("trainguard") or []
    except importlib.metadata.PackageNotFoundError:
        return RUNTIME_PACKAGES
    out = []
    for line in lines:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        env = {"python_version": python_version, "extra": ""}
        if req.marker is None or req.marker.evaluate(env):
            out.append(f"{req.name}{req.specifier}")
    return tuple(out) or RUNTIME_PACKAGES


def image_packages(packages: tuple[str, ...] | list[str], python_version: str) -> list[str]:
    """The image's pip requirements: the user's, plus trainguard's own requirements
    (torch, safetensors, ...) for every distribution the user did not name."""
    from trainguard.preflight import parse_requirement

    named = {parse_requirement(p)[0] for p in packages}
    return list(packages) + [p for p in runtime_requirements(python_version)
                             if parse_requirement(p)[0] not in named]


def preflight_target(packages: tuple[str, ...] | list[str], python_version: str = ""):
    """The preflight target of a Modal launch: what the image installs (the user's
    packages and trainguard's runtime) and what it gets as shipped source (trainguard)."""
    from trainguard.preflight import PreflightTarget

    python_version = python_version or trainguard_python()
    return PreflightTarget("modal", packages=tuple(image_packages(packages, python_version)),
                           shipped=SHIPPED_RUNTIME)


def _remote_of(local: Path, remote: str, root: Path) -> str:
    if remote:
        return remote if remote.startswith("/") else f"{REMOTE_ROOT}/{remote.strip('/')}"
    try:
        return f"{REMOTE_ROOT}/{local.relative_to(root).as_posix()}"
    except ValueError:
        return f"{REMOTE_ROOT}/{local.name}"


def resolve_add_local(entries: tuple[str, ...], cwd: str, root: str) -> dict[str, str]:
    """``--add-local`` entries -> {local path: container path} (directories stay whole).

    Raises:
        ModalConfigError: a path that does not exist, or a destination on the volume or
            over trainguard's own sources.
    """
    out = {}
    for entry in entries:
        path, sep, remote = entry.partition(":")
        local = Path(cwd, path).resolve()
        if not path or not local.exists():
            raise ModalConfigError(f"--add-local {entry!r}: {local} does not exist; give a file "
                                   f"or directory the script reads, as PATH or PATH:REMOTE")
        target = _remote_of(local, remote if sep else "", Path(root).resolve())
        if target == MOUNT_PATH or target.startswith((MOUNT_PATH + "/",
                                                      f"{REMOTE_ROOT}/trainguard")):
            raise ModalConfigError(f"--add-local {entry!r}: {target} is the volume or "
                                   f"trainguard's own code in the container; ship it elsewhere "
                                   f"(e.g. {path}:data/{local.name})")
        out[str(local)] = target
    return out


def shipped_paths(script: str, root: str = "", add_local: tuple[str, ...] = (),
                  cwd: str = "") -> tuple[str, ...]:
    """Container paths a launch of ``script`` ships: the script, its local modules, and
    ``add_local`` (what preflight's relative-path warning compares against).

    Raises:
        ModalConfigError: an ``add_local`` entry is refused (:func:`resolve_add_local`).
    """
    closure = import_closure(script, root or None)
    added = resolve_add_local(tuple(add_local), cwd or os.getcwd(), root or closure.root)
    return tuple(sorted({**shipped_files(closure), **_expand(added)}.values()))


def _expand(added: dict[str, str]) -> dict[str, str]:
    files = {}
    for local, remote in added.items():
        path = Path(local)
        if path.is_dir():
            for item in _sources(path):
                files[str(item)] = f"{remote}/{item.relative_to(path).as_posix()}"
        else:
            files[local] = remote
    return files


def build_plan(spec: JobSpec, options: ModalOptions, closure: ImportClosure | None = None
               ) -> ModalPlan:
    """Resolve a Modal launch of ``spec`` without contacting Modal.

    Raises:
        ModalConfigError: the timeout, retries or GPU are outside Modal's limits, or the
            torchrun workers do not fit the GPUs.
    """
    retries = validate_retries(spec.retry.retries, spec.retry.delay, spec.retry.backoff,
                               spec.retry.max_delay)
    timeout = validate_timeout(spec.timeout)
    check_torchrun(spec.torchrun, options)
    if options.nnodes > 1:
        _clustered(options.nnodes)  # an old modal fails here, before anything is built
    closure = closure or import_closure(spec.script, options.root or None)
    added = resolve_add_local(options.add_local, spec.cwd, options.root or closure.root)
    run_dir = f"{MOUNT_PATH}/{spec.name}"
    # The job travels in the function's input: no --env values in it (they are a Secret).
    job = {"script": f"{REMOTE_ROOT}/{Path(spec.script).name}", "args": list(spec.args),
           "run_dir": run_dir, "volume": options.volume, "mount_path": MOUNT_PATH,
           "timeout": timeout, "env": {}, "torchrun": None}
    command = None
    if spec.torchrun is not None:
        job["torchrun"] = {"nproc_per_node": spec.torchrun["nproc_per_node"],
                           "nnodes": options.nnodes, "master_port": MASTER_PORT,
                           "max_restarts": spec.torchrun.get("max_restarts", 0)}
        placeholder = SimpleNamespace(rank=0, container_ips=["<rank-0-ip>"] * options.nnodes)
        command = torchrun_argv(job, placeholder, python="python")
    package_dir = Path(trainguard.__file__).parent
    return ModalPlan(
        job=job, app_name=options.app_name or f"trainguard-{spec.name}",
        python_version=options.python_version,
        packages=image_packages(options.packages, options.python_version),
        files=dict(sorted({**shipped_files(closure), **_expand(added)}.items())),
        local_modules=dict(closure.local),
        third_party=sorted(closure.third_party), runtime={str(package_dir):
                                                          f"{REMOTE_ROOT}/trainguard"},
        missing=[f"{s.module} ({s})" for s in closure.missing], volume=options.volume,
        mount_path=MOUNT_PATH, run_dir=run_dir, retries=retries, timeout=timeout,
        gpu=options.gpu, cpu=options.cpu, memory=options.memory,
        nproc_per_node=spec.torchrun["nproc_per_node"] if spec.torchrun else None,
        nnodes=options.nnodes, clustered=options.nnodes > 1, rdma=options.rdma,
        command=command, secrets=list(options.secrets), env_keys=sorted(spec.env),
        added=added, closure=closure, env=dict(spec.env))


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
    for local, remote in plan.added.items():
        if Path(local).is_dir():
            image = image.add_local_dir(local, remote, ignore=_ignore)
        else:
            image = image.add_local_file(local, remote)
    return image


def single_use_option() -> dict:
    """``single_use_containers=True``, or ``max_inputs=1`` on a modal that predates it."""
    import inspect

    import modal

    params = inspect.signature(modal.App.function).parameters
    return {"single_use_containers": True} if "single_use_containers" in params else {
        "max_inputs": 1}


def build_secrets(plan: ModalPlan) -> list:
    """``modal.Secret.from_name`` of each ``--secret``, and one ``Secret.from_dict`` with
    the ``--env`` values (so they reach the container as variables, not in the input)."""
    import modal

    secrets = [modal.Secret.from_name(name) for name in plan.secrets]
    if plan.env:
        secrets.append(modal.Secret.from_dict(dict(plan.env)))
    return secrets


def build_app(plan: ModalPlan):
    """A real ``modal.App`` with one function running the job (offline; nothing is sent).

    A clustered plan's function is ``modal.clustered(size=plan.nnodes, rdma=plan.rdma)``
    under ``app.function``: Modal starts that many containers together and sends the
    input to each; only rank 0's result comes back.

    Returns:
        ``(app, function)``: call ``function.spawn(plan.job)`` inside ``app.run()``.
    """
    import modal

    from trainguard.launch.modal_entry import run_job

    app = modal.App(plan.app_name)
    volume = modal.Volume.from_name(plan.volume, create_if_missing=True)
    entry = clustered_decorator(plan.nnodes, plan.rdma)(run_job) if plan.clustered else run_job
    function = app.function(
        image=build_image(plan), gpu=plan.gpu, cpu=plan.cpu, memory=plan.memory,
        volumes={plan.mount_path: volume}, retries=modal.Retries(**plan.retries),
        timeout=plan.timeout, secrets=build_secrets(plan), serialized=True,
        name="trainguard_job", **single_use_option())(entry)
    return app, function


def describe(plan: ModalPlan) -> str:
    """The plan in words (``--dry-run``)."""
    lines = [f"app       {plan.app_name} (python {plan.python_version})",
             f"gpu       {plan.gpu or 'none'}  cpu {plan.cpu or 'default'}  "
             f"memory {plan.memory or 'default'} MiB",
             *_describe_processes(plan),
             f"timeout   {human_duration(plan.timeout)} per attempt",
             f"retries   {plan.retries['max_retries']} (first after "
             f"{plan.retries['initial_delay']:g}s, x{plan.retries['backoff_coefficient']:g}, "
             f"at most {plan.retries['max_delay']:g}s); preemptions restart the input",
             f"volume    {plan.volume} mounted at {plan.mount_path}; run dir {plan.run_dir}",
             "container fresh for each attempt (single_use_containers)",
             f"secrets   {', '.join(plan.secrets) or '-'}; env "
             f"{', '.join(f'{k}=***' for k in plan.env_keys) or '-'}",
             f"packages  {' '.join(plan.packages) or '-'}",
             f"files     {len(plan.files)} shipped ({', '.join(plan.local_modules) or 'no'} "
             f"local modules; nothing from site-packages):"]
    lines += [f"  {local} -> {remote}" for local, remote in plan.files.items()]
    if plan.missing:
        lines.append("missing   " + "; ".join(plan.missing))
    return "\n".join(lines)


def _describe_processes(plan: ModalPlan) -> list[str]:
    if plan.command is None:
        script = " ".join([plan.job["script"], *plan.job["args"]])
        return [f"processes 1 (the script runs in the function's process: {script})"]
    where = (f"{plan.nnodes} nodes: a Modal cluster (modal.clustered size {plan.nnodes}, "
             f"rdma {'on' if plan.rdma else 'off'})" if plan.clustered
             else "1 node (not clustered)")
    lines = [f"processes {plan.nproc_per_node} per node x {where}",
             f"command   {' '.join(plan.command)}"]
    if plan.clustered:
        lines.append("          (node k runs it with --node-rank k; <rank-0-ip> comes from "
                     "modal.experimental.get_cluster_info() in the container)")
    return lines

