"""The Ray cluster that data hygiene runs on when ``data.yaml`` says ``backend: ray``."""

from __future__ import annotations

import os
from typing import Optional

import dagster as dg

from sleep_pipeline.data.corpus import RayOptions

ADDRESS_ENV = "SLEEP_PIPELINE_RAY_ADDRESS"


class RayClusterResource(dg.ConfigurableResource):
    """A Ray cluster by address, or a local one started inside the step.

    ``address``: ``auto`` (a cluster already running on this node, ``ray start --head``),
    ``ray://head:10001`` (Ray Client, e.g. a KubeRay ``RayCluster``'s head service), or empty for a
    local cluster of ``num_cpus`` workers for this step only. A cluster with token authentication (the
    default from Ray 2.52) needs ``RAY_AUTH_TOKEN`` in the environment, never in this config. The
    workers must be able to import ``sleep_pipeline`` (the same image, or ``pip install`` on them)."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    partition_rows: int = 50_000
    batch_rows: int = 10_000
    ingest_chunk_bytes: int = 32 << 20

    def options(self) -> RayOptions:
        return RayOptions(address=self.address or None, num_cpus=self.num_cpus, partition_rows=self.partition_rows,
                          batch_rows=self.batch_rows, ingest_chunk_bytes=self.ingest_chunk_bytes)


def from_environment() -> RayClusterResource:
    """The resource as ``definitions.py`` builds it: the address from ``$SLEEP_PIPELINE_RAY_ADDRESS``."""
    cpus = os.environ.get("SLEEP_PIPELINE_RAY_CPUS")
    return RayClusterResource(address=os.environ.get(ADDRESS_ENV) or None, num_cpus=int(cpus) if cpus else None)
