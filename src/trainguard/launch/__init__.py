"""Jobs that survive their launcher: specs, the job table, the local supervisor, sync."""

from typing import TYPE_CHECKING

from trainguard._lazy import lazy_exports

# Loaded on first use (PEP 562): the job table and specs need no torch; sync does.
__getattr__, __dir__ = lazy_exports(__name__, globals(), {
    "trainguard.launch.jobs": ("JobNotFound", "JobTable", "trainguard_home"),
    "trainguard.launch.local": ("launch",),
    "trainguard.launch.spec": ("JobSpec", "RetryPolicy", "format_duration", "parse_duration"),
    "trainguard.launch.supervisor": ("Supervisor",),
    "trainguard.launch.sync": ("sync_once", "watch"),
})

if TYPE_CHECKING:
    from trainguard.launch.jobs import JobNotFound, JobTable, trainguard_home
    from trainguard.launch.local import launch
    from trainguard.launch.spec import JobSpec, RetryPolicy, format_duration, parse_duration
    from trainguard.launch.supervisor import Supervisor
    from trainguard.launch.sync import sync_once, watch

__all__ = ["JobNotFound", "JobSpec", "JobTable", "RetryPolicy", "Supervisor", "format_duration",
           "launch", "parse_duration", "sync_once", "trainguard_home", "watch"]
