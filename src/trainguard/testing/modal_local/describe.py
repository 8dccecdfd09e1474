"""The plane as plain data: what it received (functions, files, images, retries, GPUs)
and what happened (calls, attempts, containers, volume commits)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainguard.testing.modal_local.plane import Plane


def describe_function(plane: Plane, fn) -> dict:
    """One function as the client defined it."""
    d = fn.definition
    files = sorted(path for mount_id in d.mount_ids for path in plane.mounts[mount_id].files)
    image = plane.images.get(d.image_id)
    gpu = d.resources.gpu_config
    policy = d.retry_policy
    return {
        "function_id": fn.function_id, "app_id": fn.app_id, "name": d.function_name,
        "files": files,
        "image_commands": image.commands(plane.images) if image else [],
        "gpu": {"type": gpu.gpu_type, "count": gpu.count} if gpu.gpu_type else None,
        "gpu_choices": [f"{c.gpu_type}:{c.count}" for c in fn.choices if c.gpu_type],
        "cpu": d.resources.milli_cpu / 1000 or None,
        "memory_mb": d.resources.memory_mb or None,
        "timeout": d.timeout_secs,
        "retries": {"max_retries": policy.retries,
                    "initial_delay": policy.initial_delay_ms / 1000,
                    "backoff_coefficient": policy.backoff_coefficient,
                    "max_delay": policy.max_delay_ms / 1000},
        "single_use_containers": bool(d.single_use_containers or d.max_inputs == 1),
        "volumes": {vm.mount_path: plane.volumes_by_id[vm.volume_id].name
                    for vm in d.volume_mounts},
        "secrets": [{"name": plane.secrets_by_id[s].name,
                     "keys": sorted(plane.secrets_by_id[s].env)} for s in d.secret_ids],
        "serialized": bool(d.function_serialized),
    }


def describe_call(call) -> dict:
    """One function call, its inputs and every attempt."""
    return {
        "call_id": call.call_id, "function_id": call.function.function_id,
        "app_id": call.function.app_id, "cancelled": call.cancelled,
        "inputs": [{"input_id": i.input_id, "status": i.status, "retry_count": i.retry_count,
                    "attempts": [vars(a).copy() for a in i.attempts]} for i in call.inputs],
    }


def describe_plane(plane: Plane) -> dict:
    """Everything, JSON-ready."""
    from modal_proto import api_pb2

    return {
        "apps": [{"app_id": a.app_id, "description": a.description,
                  "state": api_pb2.AppState.Name(a.state), "running": a.running}
                 for a in plane.apps.values()],
        "functions": [describe_function(plane, f) for f in plane.functions.values()],
        "calls": [describe_call(c) for c in plane.calls.values()],
        "containers": [{"task_id": t.task_id, "function_id": t.function.function_id,
                        "running": not t.exited.is_set(), "exit_code": t.exit_code,
                        "preempted": t.preempted, "timed_out": t.timed_out,
                        "dir": str(t.dir)} for t in plane.tasks.values()],
        "volumes": [{"name": v.name, "volume_id": v.volume_id, "commits": v.commits,
                     "committed_dir": str(v.committed)} for v in plane.volumes.values()],
        "unimplemented": list(plane.unimplemented),
    }
