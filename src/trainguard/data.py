"""Kept for compatibility: the dataset manifests moved to :mod:`trainguard.data_manifest`.

``from trainguard.data import DataGate`` keeps working; new code imports
``from trainguard import DataGate`` (or from ``trainguard.data_manifest``).
"""

from trainguard.data_manifest import (
    FORCE_ENV,
    MANIFEST_NAME,
    DataGate,
    DataManifest,
    FileRecord,
    StatsFn,
    build,
    check_requirements,
    load_stats_fn,
    no_data,
    validate,
)

__all__ = ["FORCE_ENV", "MANIFEST_NAME", "DataGate", "DataManifest", "FileRecord", "StatsFn",
           "build", "check_requirements", "load_stats_fn", "no_data", "validate"]
