"""Plain Modal functions against the local control plane: what it models, shown with the
real client (run by tests/integration/test_modal_local.py; prints one JSON document)."""

import json
import os
import sys
import time

import modal

app = modal.App("plain-functions")
COUNT = {"n": 0}


def flaky() -> dict:
    COUNT["n"] += 1  # survives into the next input only if the process is reused
    if COUNT["n"] == 1:
        raise RuntimeError("first call fails")
    return {"pid": os.getpid(), "calls_in_this_process": COUNT["n"]}


def sleeper() -> None:
    time.sleep(60)


def needs_local_module() -> None:
    import helpers_modal  # noqa: F401 (exists next to this file, but is not shipped)


def crasher() -> None:
    os._exit(3)


retries = modal.Retries(max_retries=1, initial_delay=0.0, backoff_coefficient=1.0)
reused = app.function(serialized=True, retries=retries, name="reused")(flaky)
fresh = app.function(serialized=True, retries=retries, single_use_containers=True,
                     name="fresh")(flaky)
timed = app.function(serialized=True, timeout=2, name="timed")(sleeper)
missing = app.function(serialized=True, name="missing")(needs_local_module)
crashing = app.function(serialized=True, name="crashing")(crasher)


def outcome(function) -> str:
    try:
        return json.dumps(function.remote())
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


if __name__ == "__main__":
    with app.run():
        results = {name: outcome(f) for name, f in [
            ("reused", reused), ("fresh", fresh), ("timed", timed), ("missing", missing),
            ("crashing", crashing)]}
        try:  # an RPC the plane does not model fails loudly, naming itself
            modal.Dict.from_name("d", create_if_missing=True).hydrate()
        except Exception as exc:
            results["unmodelled"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results), file=sys.stdout, flush=True)
