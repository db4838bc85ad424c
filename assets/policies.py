"""Operational policies shared by the assets and ops.

``IO_RETRY`` goes on steps whose work is reading or writing files and the DuckDB store (sources on a
network share that is remounting, a registry write that hits a full or flaky disk): such a step is run
again, up to twice, after a short exponential back-off. Training-type steps get no retry (a retry would
start hours of work again; they resume from their own checkpoints when launched again) but a maximum
runtime instead: ``DeepSpeedClusterResource.max_runtime_s`` per launch, and a run-level
``dagster/max_runtime`` that run monitoring enforces (``dagster.yaml``, ``rhythms.yaml``). A failure that
cannot pass by waiting (a wrong config, a refused release) raises ``permanent(...)``, which is not retried.
"""

import dagster as dg

IO_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)  # again after 5 s, then 15 s


def permanent(message: str) -> dg.Failure:
    """A step failure that retrying cannot fix (bad config, a refused release): fails at once."""
    return dg.Failure(message, allow_retries=False)
