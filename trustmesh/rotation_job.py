"""The cert-rotation job behind ``trustmesh rotate``: one run, its report and its exit code.

One run walks :mod:`pki.rotation`'s stage table: plan under the store lock, renew the issuer when
due, and report whether a human must act. The outcome maps to the documented exit codes in one
place (:func:`run_once`), for cron, a Kubernetes CronJob or the built-in scheduler alike.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pki.errors import PKIError, StoreCorrupt, StoreLocked, StoreNotInitialized
from pki.renewal import RenewalPolicy
from pki.rotation import Event, RotationPlan, Stage, advance, rotate_if_due
from pki.store import FileStore, StoreState


class ExitCode(enum.IntEnum):
    """``trustmesh rotate`` exit codes (also in ``--help`` and the README)."""

    OK = 0  # renewed, or nothing due
    FAILED = 1  # a rotation was due and failed
    USAGE = 2  # usage or configuration error (no store, unreadable store, bad flags)
    HUMAN_ACTION = 3  # success, but a human must act (anchor expiring, issuer cut short)
    LOCKED = 4  # another run holds the store lock


@dataclass(frozen=True, slots=True)
class RunReport:
    """What one run did, for people (table) and machines (``-o json``)."""

    store: str
    started: datetime
    dry_run: bool
    stage: Stage
    exit_code: ExitCode
    stages: tuple[Stage, ...]
    plan: RotationPlan | None = None
    new_state: StoreState | None = None
    error: str | None = None
    human_actions: tuple[str, ...] = field(default=())

    @property
    def renewed(self) -> bool:
        return self.new_state is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "store": self.store,
            "time": self.started.isoformat(),
            "dryRun": self.dry_run,
            "stage": self.stage.value,
            "stages": [s.value for s in self.stages],
            "exitCode": int(self.exit_code),
            "renewed": self.renewed,
            "humanActions": list(self.human_actions),
            "error": self.error,
        }
        if self.plan is not None:
            p = self.plan
            out["issuer"] = {
                "action": p.issuer.action.value,
                "due": p.issuer.due,
                "renewAt": p.issuer.renew_at.isoformat(),
                "notAfter": p.issuer.expires_at.isoformat(),
                "remainingSeconds": int(p.issuer.remaining.total_seconds()),
            }
            out["anchor"] = {
                "status": p.anchor_status.value,
                "notAfter": p.anchor_expires.isoformat(),
            }
        if self.new_state is not None and self.new_state.issuer is not None:
            cert = self.new_state.issuer.certificate
            out["newIssuer"] = {
                "version": self.new_state.version,
                "fingerprint": cert.fingerprint,
                "notBefore": cert.not_before.isoformat(),
                "notAfter": cert.not_after.isoformat(),
            }
        return out


def run_once(
    store: FileStore,
    *,
    now: datetime,
    renew_before: timedelta | None = None,
    dry_run: bool = False,
) -> RunReport:
    """Run the rotation job once at ``now`` and classify the outcome; never raises PKIError."""
    policy = (
        RenewalPolicy(fraction=None, renew_before=renew_before)
        if renew_before is not None
        else RenewalPolicy()
    )
    stages = [Stage.START]

    def report(code: ExitCode, **kw: Any) -> RunReport:
        return RunReport(
            store=str(store.root),
            started=now,
            dry_run=dry_run,
            stage=stages[-1],
            exit_code=code,
            stages=tuple(stages),
            **kw,
        )

    try:
        plan, new_state = rotate_if_due(store, policy, now=now, dry_run=dry_run)
    except StoreLocked as e:
        stages.append(advance(stages[-1], Event.ERROR))
        return report(ExitCode.LOCKED, error=str(e))
    except (StoreNotInitialized, StoreCorrupt) as e:
        stages.append(advance(stages[-1], Event.ERROR))
        return report(ExitCode.USAGE, error=str(e))
    except PKIError as e:
        # The plan succeeded but the renewal did not (e.g. anchor key offline).
        stages += [Stage.PLANNED, Stage.RENEWING, Stage.FAILED]
        return report(ExitCode.FAILED, error=str(e))
    stages.append(advance(stages[-1], Event.PLAN_OK))
    if plan.renew_issuer and dry_run:
        stages.append(advance(stages[-1], Event.DRY_RUN))
    elif plan.renew_issuer:
        stages.append(advance(stages[-1], Event.DUE))
        stages.append(advance(stages[-1], Event.COMMITTED))
    elif plan.issuer.due:  # due, but cannot renew: the anchor has expired
        stages.append(advance(stages[-1], Event.HUMAN_ACTION))
        return report(
            ExitCode.HUMAN_ACTION, plan=plan, human_actions=plan.human_actions, error=None
        )
    else:
        stages.append(advance(stages[-1], Event.NOT_DUE))
    if plan.human_actions:
        stages.append(advance(stages[-1], Event.HUMAN_ACTION))
        return report(
            ExitCode.HUMAN_ACTION, plan=plan, new_state=new_state, human_actions=plan.human_actions
        )
    return report(ExitCode.OK, plan=plan, new_state=new_state)
