"""Jobs that survive their launcher: specs, the job table, the local supervisor, sync."""

from trainguard.launch.jobs import JobNotFound, JobTable, trainguard_home
from trainguard.launch.local import launch
from trainguard.launch.spec import JobSpec, RetryPolicy, format_duration, parse_duration
from trainguard.launch.supervisor import Supervisor
from trainguard.launch.sync import sync_once, watch

__all__ = ["JobNotFound", "JobSpec", "JobTable", "RetryPolicy", "Supervisor", "format_duration",
           "launch", "parse_duration", "sync_once", "trainguard_home", "watch"]
