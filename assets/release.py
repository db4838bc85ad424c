"""Release operations as Dagster jobs: roll back / hot switch the live release from the UI."""

from typing import Optional

import dagster as dg

from resources.storage import StorageResource
from sleep_pipeline.release import registry


class RollbackConfig(dg.Config):
    version: Optional[str] = None  # None: the release that was live before the current one
    reason: str = "rollback from the Dagster UI"


@dg.op(description="Point the live release at an earlier one (its checkpoint is re-verified first).")
def rollback_live_release(context: dg.OpExecutionContext, config: RollbackConfig, storage: StorageResource) -> None:
    before = registry.live(storage.db_path)
    rel = registry.rollback(storage.db_path, config.version, reason=config.reason)
    context.log.info(f"live: {before.version if before else None} -> {rel.version} ({rel.checkpoint_path})")


@dg.job(description="Roll back (hot switch) the live release; config `version` picks the target.")
def rollback_release():
    rollback_live_release()
