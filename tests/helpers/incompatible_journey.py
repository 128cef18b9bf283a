"""A journey workflow with an incompatible change, for the replay test to catch.

Its own module: the workflow sandbox re-imports the module that defines a workflow.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from hilo.journeys.runs import JourneyInput, JourneyResult
    from workflows.journey import JourneyWorkflow


@workflow.defn(name="Journey")
class SendsBeforeWaiting(JourneyWorkflow):
    """An incompatible change: the first wait is skipped."""

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        self.nodes.pop("first_reminder_delay", None)
        if input.state is None:
            self.definition.steps.pop(0)
        return await super().run(input)
