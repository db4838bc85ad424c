"""Release operations as Dagster jobs, launched from the UI with their config form (or by a sensor):
roll back / hot switch the live release, promote the canary to live, raise a regression alarm."""

from typing import Optional

import dagster as dg

from assets.policies import IO_RETRY, permanent
from resources.storage import StorageResource
from sleep_pipeline.release import registry


class RollbackConfig(dg.Config):
    version: Optional[str] = None  # None: the release that was live before the current one
    reason: str = "rollback from the Dagster UI"


@dg.op(retry_policy=IO_RETRY, description="Point the live release at an earlier one (its checkpoint is re-verified first).")
def rollback_live_release(context: dg.OpExecutionContext, config: RollbackConfig, storage: StorageResource) -> None:
    before = registry.live(storage.db_path)
    try:
        rel = registry.rollback(storage.db_path, config.version, reason=config.reason)
    except registry.ReleaseError as exc:
        raise permanent(str(exc)) from exc
    context.log.info(f"live: {before.version if before else None} -> {rel.version} ({rel.checkpoint_path})")


@dg.job(description="Roll back (hot switch) the live release; config `version` picks the target.")
def rollback_release():
    rollback_live_release()


class PromoteConfig(dg.Config):
    version: Optional[str] = None  # the canary meant (refused if the canary is another one); None: the canary
    reason: str = "promoted from the Dagster UI"


@dg.op(retry_policy=IO_RETRY, description="Make the canary release live (stable); refused while it has an open regression alarm.")
def promote_canary_release(context: dg.OpExecutionContext, config: PromoteConfig, storage: StorageResource) -> None:
    before = registry.live(storage.db_path)
    try:
        rel = registry.promote(storage.db_path, config.version, reason=config.reason)
    except registry.ReleaseError as exc:
        raise permanent(str(exc)) from exc
    context.log.info(f"promoted canary {rel.version} to live (was {before.version if before else None})")


@dg.job(description="Promote the canary release to live (stable). The canary_promotion sensor launches it after the "
                    "rhythm's soak period; a person launches it from the UI or `sleep-pipeline release promote`.")
def promote_canary():
    promote_canary_release()


class AlarmConfig(dg.Config):
    reason: str
    version: Optional[str] = None  # None: the live release
    source: str = "person"


@dg.op(retry_policy=IO_RETRY, description="Record a regression alarm on a release (default: the live one).")
def raise_regression_alarm(context: dg.OpExecutionContext, config: AlarmConfig, storage: StorageResource) -> None:
    live = registry.live(storage.db_path)
    version = config.version or (live.version if live else None)
    if version is None:
        raise permanent("nothing is live: name the release the alarm is about (config version)")
    alarm = registry.raise_alarm(storage.db_path, version, config.reason, config.source)
    context.log.warning(f"regression alarm {alarm} on {version}: {config.reason}")


@dg.job(description="Raise a regression alarm on a release: its canary is not promoted, the daily rhythm rolls a "
                    "rejected day back, and the training trigger starts a cycle early.")
def raise_alarm():
    raise_regression_alarm()
