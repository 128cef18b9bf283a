"""Taking a customer out of every ad audience, durably, after they unsubscribed.

The dispatcher starts one per outbox entry that an unsubscribe (or another consent
withdrawal from delivery feedback) committed; the activity does the provider calls.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from hilo.journeys.runs import (
        LEAVE_AUDIENCES,
        LEAVE_AUDIENCES_WORKFLOW,
        LeaveAudiencesRequest,
        LeaveAudiencesResult,
    )


@workflow.defn(name=LEAVE_AUDIENCES_WORKFLOW)
class LeaveAudiencesWorkflow:
    @workflow.run
    async def run(self, request: LeaveAudiencesRequest) -> LeaveAudiencesResult:
        workflow.set_current_details(f"removing {request.customer_id}: {request.reason}")
        return await workflow.execute_activity(
            LEAVE_AUDIENCES,
            request,
            result_type=LeaveAudiencesResult,
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=2),
                maximum_interval=timedelta(minutes=10),
                maximum_attempts=12,
            ),
            summary=f"leave every ad audience: {request.reason}"[:200],
        )
