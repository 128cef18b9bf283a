"""The journey interpreter: one deterministic workflow runs every journey definition.

Steps are compiled into nodes linked by ``next`` so that the position of an instance is one
step id: it survives continue-as-new, and operators read it in the Temporal UI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import (
    RetryPolicy,
    SearchAttributeUpdate,
    TypedSearchAttributes,
)
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from hilo.events import CustomerEvent
    from hilo.ids import message_id, stable_fraction
    from hilo.journeys import search_attributes as attrs
    from hilo.journeys.conditions import Condition, SameValue, exact_equal, lookup, same_value
    from hilo.journeys.definitions import (
        AnyStep,
        BranchStep,
        EventMatch,
        ExitStep,
        Goal,
        HandoffStep,
        Node,
        SendStep,
        SplitStep,
        UpdateProfileStep,
        WaitForStep,
        WaitStep,
        compile_steps,
        first_of,
        walk_steps,
    )
    from hilo.journeys.durations import format_duration
    from hilo.journeys.runs import (
        BEST_SEND_TIME,
        FINISH,
        JOURNEY_WORKFLOW,
        LEAVE_AUDIENCES,
        LOAD_PROFILE,
        NEXT_WINDOW_OPENING,
        NOTE,
        SEND_MESSAGE,
        SIGNAL_EVENT,
        SIGNAL_IDENTIFIED,
        SIGNAL_STOP,
        UPDATE_PROFILE,
        BestTimeAnswer,
        BestTimeRequest,
        FinishRequest,
        IdentifiedSignal,
        InstanceStatus,
        JourneyInput,
        JourneyProgress,
        JourneyResult,
        JourneyState,
        LeaveAudiencesRequest,
        LeaveAudiencesResult,
        NoteRequest,
        ProfileRequest,
        ProfileSnapshot,
        SendRequest,
        SendResult,
        StopRequest,
        UpdateProfileRequest,
        WindowOpening,
        WindowRequest,
        profile_paths,
    )

QUICK = timedelta(seconds=30)
# Instances started before it compare with ``==`` (555 ≠ "555") and note no near misses.
SAME_VALUE_RULE = "same-value-rule"
# Search attributes are written where a status lasts (waits) and at the end: each upsert is a
# history event and a visibility write, and a send or a branch is over in milliseconds.
LASTING_STATUSES = frozenset({"waiting", "waiting_for", "deferred"})
SEND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    maximum_attempts=12,
)


@workflow.defn(name=JOURNEY_WORKFLOW)
class JourneyWorkflow:
    @workflow.init
    def __init__(self, input: JourneyInput) -> None:
        self.input = input
        self.definition = input.journey.definition
        self.nodes = compile_steps(list(self.definition.steps))
        self.state = input.state.model_copy() if input.state else JourneyState()
        self.status = "starting"
        self.step: str | None = self.state.cursor
        self.listening: set[str] = set()
        self.waiting: WaitForStep | None = None  # the wait_for step the instance is in
        self.answer: int | None = None  # the outcome of the wait_for an event chose
        self.final_status: InstanceStatus | None = None
        self.ended = False
        # A skipped send completes like a sent one in the Temporal UI: the current details
        # name the last skip, and the next timer's or activity's summary mentions it.
        self.details = ""
        self.last_skip: str | None = None
        self.unmentioned_skip: str | None = None
        self.profile: ProfileSnapshot | None = None
        self.steps_this_run = 0
        self.seen: dict[str, None] = {}  # recent event ids, oldest first
        # The step, status and awaited events the server holds for this run: set at start
        # (for a journey that opens with a wait) or by the last upsert.
        self.shown = _held(workflow.info().typed_search_attributes)

    # ------------------------------------------------------------ signals and queries

    @workflow.signal(name=SIGNAL_EVENT)
    async def on_event(self, event: CustomerEvent) -> None:
        if event.message_id == self.input.trigger.message_id or event.message_id in self.seen:
            return  # the trigger itself, or an event routed twice after a retried delivery
        self.seen[event.message_id] = None
        if len(self.seen) > 200:
            del self.seen[next(iter(self.seen))]
        context = self._context()
        data = event.as_context()
        near_misses: list[str] = []
        if self.state.exit_reason is None:
            for rule in self.definition.exit:
                if self._matches(rule, data, context):
                    self.state.exit_reason = rule.reason or f"exit event: {event.name}"
                    break
            else:
                near_misses += [
                    f"{event.name} did not end the journey: {why}"
                    for why in _mismatches(self.definition.exit, data, context)
                ]
        goal = self.definition.goal
        if goal and self.state.converted_at is None and self._matches(goal, data, context):
            started = self.state.started_at or workflow.now()
            if event.timestamp - started <= goal.within:
                self.state.converted_at = event.timestamp
                if goal.revenue:
                    self.state.revenue = _number(event.properties, goal.revenue)
        waiting = self.waiting
        if waiting is not None and self.state.exit_reason is None and self.answer is None:
            for index, outcome in enumerate(waiting.events):
                if self._matches(outcome, data, context):
                    self.answer = index
                    break
            else:
                near_misses += [
                    f"{event.name} did not end the wait at {waiting.id}: {why}"
                    for why in _mismatches(waiting.events, data, context)
                ]
        if near_misses and workflow.patched(SAME_VALUE_RULE):
            # Nothing else would show why a purchase did not end the cart: say it once.
            info = workflow.info()
            await self._activity(
                NOTE,
                NoteRequest(
                    workflow_id=info.workflow_id,
                    run_id=self.run_id,
                    journey_key=self.definition.key,
                    customer_id=self.customer_id,
                    step_id=self.step,
                    event_message_id=event.message_id,
                    summary="; ".join(near_misses),
                    noted_at=workflow.now(),
                ),
                summary=f"note: {near_misses[0]}"[:200],
            )

    @workflow.signal(name=SIGNAL_STOP)
    def on_stop(self, request: StopRequest) -> None:
        if self.state.exit_reason is None:
            self.state.exit_reason = request.reason
            self.final_status = request.status

    @workflow.signal(name=SIGNAL_IDENTIFIED)
    def on_identified(self, signal: IdentifiedSignal) -> None:
        # The anonymous visitor who entered is a known customer now: later sends, profile
        # reads and the operator's search use the known id.
        self.state.customer_id = signal.customer_id
        self.profile = None
        if self.input.search_attributes:
            workflow.upsert_search_attributes([attrs.CUSTOMER.value_set(signal.customer_id)])

    @property
    def customer_id(self) -> str:
        return self.state.customer_id or self.input.customer_id

    @workflow.query(name="progress")
    def progress(self) -> JourneyProgress:
        return JourneyProgress(
            journey=self.definition.key,
            version=self.input.journey.version,
            customer_id=self.customer_id,
            step=self.step,
            status=self.status,
            waiting_for=list(self._awaited()),
            sent=self.state.sent,
            exit_reason=self.state.exit_reason,
        )

    # ------------------------------------------------------------ the run

    def _by_rule(self, check: Callable[[SameValue], bool]) -> bool:
        """``check`` under the comparison rule of this instance (hilo.journeys.conditions).

        Instances started before :func:`same_value` keep ``==``. The patch is asked only
        when the two rules disagree, so a journey that never meets 555 against "555" pays
        no marker (nor the search-attribute write that comes with it).
        """
        answer = check(same_value)
        if answer == check(exact_equal) or workflow.patched(SAME_VALUE_RULE):
            return answer
        return not answer

    def _holds(self, condition: Condition, context: dict[str, Any]) -> bool:
        return self._by_rule(lambda same: condition.evaluate(context, same))

    def _matches(
        self, rule: EventMatch | Goal, event: dict[str, Any], context: dict[str, Any]
    ) -> bool:
        match = rule.as_match() if isinstance(rule, Goal) else rule
        return self._by_rule(lambda same: match.matches(event, context, same))

    @property
    def run_id(self) -> str:
        # The first run's id names the enrollment: stable across continue-as-new and retries.
        return self.state.enrollment_run_id or workflow.info().first_execution_run_id

    @workflow.run
    async def run(self, input: JourneyInput) -> JourneyResult:
        self.state.enrollment_run_id = self.run_id
        if input.state is None:
            self.state.started_at = workflow.now()
            self.state.cursor = first_of(list(self.definition.steps), None)
            holdout = self._in_holdout()
            # No enroll activity: the router records each entry as it starts the workflow.
            if holdout:
                return await self._finish("holdout", "control group: no sends")

        while self.state.cursor is not None and self.state.exit_reason is None:
            if self._should_continue_as_new():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._next_run_input())
            node = self.nodes[self.state.cursor]
            self.step = node.step.id
            self.steps_this_run += 1
            self.state.step_counts[node.step.id] = self.state.step_counts.get(node.step.id, 0) + 1
            self.state.cursor = await self._run_step(node)

        if self.state.exit_reason is not None:
            return await self._finish(self.final_status or "exited", self.state.exit_reason)
        return await self._finish("completed", None)

    async def _run_step(self, node: Node) -> str | None:
        step = node.step
        if isinstance(step, SendStep):
            return await self._send(step, node.next)
        if isinstance(step, HandoffStep):
            return await self._handoff(step, node.next)
        if isinstance(step, WaitStep):
            return await self._wait(step, node.next)
        if isinstance(step, WaitForStep):
            return await self._wait_for(step, node.next)
        if isinstance(step, BranchStep):
            return await self._branch(step, node.next)
        if isinstance(step, SplitStep):
            return self._split(step, node.next)
        if isinstance(step, UpdateProfileStep):
            self._show(step, "updating profile", f"update profile: {step.id}")
            await self._activity(
                UPDATE_PROFILE,
                UpdateProfileRequest(customer_id=self.customer_id, set=step.set, unset=step.unset),
                summary=self._summary(f"{step.id}: update profile"),
            )
            self.profile = None  # read it again when a later step needs it
            return node.next
        if isinstance(step, ExitStep):
            self.state.exit_reason = step.reason
            return None
        raise AssertionError(f"unhandled step {step!r}")  # check_journey forbids this

    # ------------------------------------------------------------ steps

    async def _send(self, step: SendStep, following: str | None) -> str | None:
        self._show(step, "sending", f"sending {step.channel} `{step.template}`")
        result = await self._deliver(
            step.id,
            step.channel,
            step.template,
            step.category,
            step.content(),
            ignore_policy=step.ignore_policy,
            step=step,
            topic=step.topic,
        )
        if result.status == "failed" and step.on_failure == "exit":
            self.state.exit_reason = f"{step.id} failed: {result.reason}"
            return None
        if result.status == "skipped" and step.on_skip == "exit":
            self.state.exit_reason = f"{step.id} skipped: {result.reason}"
            return None
        return following

    async def _handoff(self, step: HandoffStep, following: str | None) -> str | None:
        self._show(step, "handing off", f"handing off to {step.team}")
        content = {
            "note": step.note,
            "team": step.team,
            "priority": step.priority,
            "skills": ",".join(step.skills),
        }
        await self._deliver(step.id, "handoff", f"handoff_{step.team}", "transactional", content)
        return following

    async def _deliver(
        self,
        step_id: str,
        channel: str,
        template: str,
        category: str,
        content: dict[str, str],
        ignore_policy: bool = False,
        step: AnyStep | None = None,
        topic: str | None = None,
    ) -> SendResult:
        """Send, asking again after each deferral of the contact policy (quiet hours,
        allowed days, minimum gap): the deferral is a durable timer an exit rule can cut."""
        while True:
            result = await self._send_once(
                step_id, channel, template, category, content, ignore_policy, topic
            )
            if result.status != "deferred" or result.defer_until is None:
                return result
            delay = max(result.defer_until - workflow.now(), timedelta(0))
            label = f"contact policy: {result.reason}"
            if step is not None:
                self._show(step, "deferred", f"{label} — sending in {format_duration(delay)}")
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self.state.exit_reason is not None,
                    timeout=delay,
                    timeout_summary=self._summary(f"{step_id}: {label}"),
                )
            if self.state.exit_reason is not None:
                return SendResult(
                    message_id=result.message_id,
                    status="skipped",
                    reason=f"journey ended while deferred: {self.state.exit_reason}",
                )

    async def _send_once(
        self,
        step_id: str,
        channel: str,
        template: str,
        category: str,
        content: dict[str, str],
        ignore_policy: bool,
        topic: str | None = None,
    ) -> SendResult:
        info = workflow.info()
        iteration = self.state.step_counts.get(step_id, 1)
        request = SendRequest(
            message_id=message_id(info.workflow_id, self.run_id, step_id, iteration),
            workflow_id=info.workflow_id,
            run_id=self.run_id,
            journey_key=self.definition.key,
            journey_version=self.input.journey.version,
            customer_id=self.customer_id,
            step_id=step_id,
            iteration=iteration,
            channel=channel,
            template=template,
            category="transactional" if category == "transactional" else "marketing",
            content=content,
            trigger_message_id=self.input.trigger.message_id,
            ignore_policy=ignore_policy,
            topic=topic,
            scheduled_at=workflow.now(),
        )
        try:
            result = await workflow.execute_activity(
                SEND_MESSAGE,
                request,
                result_type=SendResult,
                start_to_close_timeout=timedelta(seconds=self.input.send_timeout_seconds),
                retry_policy=SEND_RETRY,
                summary=self._summary(f"{step_id}: {channel} {template}"),
            )
        except ActivityError as error:
            cause = error.cause
            return SendResult(
                message_id=request.message_id,
                status="failed",
                reason=str(cause.message if cause and hasattr(cause, "message") else error),
            )
        if result.status == "sent":
            self.state.sent += 1
        elif result.status == "skipped":
            self.last_skip = f"{step_id} ({channel} {template}) skipped: {result.reason}"
            self.unmentioned_skip = self.last_skip
            self._details(self.details)
        return result

    async def _wait(self, step: WaitStep, following: str | None) -> str | None:
        if step.duration is not None:
            delay = step.duration
            label = format_duration(delay)
        elif step.best_time is not None:
            info = workflow.info()
            iteration = self.state.step_counts.get(step.id, 1)
            best = await self._activity(
                BEST_SEND_TIME,
                BestTimeRequest(
                    customer_id=self.customer_id,
                    key=message_id(info.workflow_id, self.run_id, step.id, iteration),
                    now=workflow.now(),
                    fallback_hour=step.best_time.fallback_hour,
                    max_delay_seconds=step.best_time.max_delay.total_seconds(),
                ),
                summary=self._summary(f"{step.id}: best time to reach this customer"),
                result_type=BestTimeAnswer,
            )
            delay = max(best.at - workflow.now(), timedelta(0))
            label = f"{format_duration(delay)} for the best time: {best.reason}"
        else:
            assert step.until is not None
            opening = await self._activity(
                NEXT_WINDOW_OPENING,
                WindowRequest(customer_id=self.customer_id, window=step.until, now=workflow.now()),
                summary=self._summary(
                    f"{step.id}: next {step.until.start}-{step.until.end} local time"
                ),
                result_type=WindowOpening,
            )
            delay = max(opening.at - workflow.now(), timedelta(0))
            label = f"{format_duration(delay)} until {step.until.start} {opening.timezone}"
        self._show(step, "waiting", f"waiting {label}")
        if delay > timedelta(0):
            # A wait that an exit rule can cut short: a condition with a timeout, not a sleep.
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self.state.exit_reason is not None,
                    timeout=delay,
                    timeout_summary=self._summary(f"{step.id}: wait {label}"),
                )
        return following

    async def _wait_for(self, step: WaitForStep, following: str | None) -> str | None:
        self.answer = None
        self.listening = {outcome.event for outcome in step.events}
        self.waiting = step
        names = ", ".join(outcome.event for outcome in step.events)
        self._show(
            step,
            "waiting_for",
            f"waiting up to {format_duration(step.timeout)} for: {names}",
        )
        try:
            # on_event picks the outcome, in the order events arrive.
            await workflow.wait_condition(
                lambda: self.state.exit_reason is not None or self.answer is not None,
                timeout=step.timeout,
                timeout_summary=self._summary(
                    f"{step.id}: up to {format_duration(step.timeout)} for {names}"
                ),
            )
        except TimeoutError:
            return first_of(list(step.on_timeout), following)
        finally:
            self.listening = set()
            self.waiting = None
        if self.state.exit_reason is not None or self.answer is None:
            return None  # exit rule fired while waiting
        return first_of(list(step.events[self.answer].steps), following)

    async def _branch(self, step: BranchStep, following: str | None) -> str | None:
        self._show(step, "deciding", "evaluating branch conditions")
        needs_profile = any(
            path.startswith("profile.") for b in step.branches for path in b.when.paths()
        )
        if needs_profile:
            await self._refresh_profile(step.id)
        context = self._context()
        for branch in step.branches:
            if self._holds(branch.when, context):
                return first_of(list(branch.steps), following)
        return first_of(list(step.otherwise), following)

    def _split(self, step: SplitStep, following: str | None) -> str | None:
        point = stable_fraction(self.definition.key, self.input.customer_id, step.id)
        total = sum(v.weight for v in step.variants)
        cumulative = 0.0
        chosen = step.variants[-1]
        for variant in step.variants:
            cumulative += variant.weight / total
            if point < cumulative:
                chosen = variant
                break
        self._show(step, "splitting", f"variant {chosen.name}")
        return first_of(list(chosen.steps), following)

    # ------------------------------------------------------------ helpers

    async def _refresh_profile(self, step_id: str) -> None:
        self.profile = await self._activity(
            LOAD_PROFILE,
            # Only what the conditions read comes back into the history, not the address
            # book: templates read the profile in the send activity.
            ProfileRequest(customer_id=self.customer_id, paths=profile_paths(self.definition)),
            summary=self._summary(f"{step_id}: read profile"),
            result_type=ProfileSnapshot,
        )

    def _context(self) -> dict[str, Any]:
        return {
            "trigger": self.input.trigger.as_context(),
            "profile": self.profile.as_context() if self.profile else {},
        }

    def _in_holdout(self) -> bool:
        percent = self.definition.entry.holdout_percent
        if percent <= 0:
            return False
        point = stable_fraction(
            self.definition.key, self.input.customer_id, self.input.instance_key or "", "holdout"
        )
        return point * 100 < percent

    def _should_continue_as_new(self) -> bool:
        return (
            self.steps_this_run >= self.input.max_steps_per_run
            or workflow.info().is_continue_as_new_suggested()
        )

    def _next_run_input(self) -> JourneyInput:
        return self.input.model_copy(update={"state": self.state})

    async def _activity(
        self, name: str, request: Any, summary: str, result_type: type | None = None
    ) -> Any:
        """A bookkeeping step (profile read or update, time window, finish): milliseconds of
        database work in this worker, so a local activity. It is recorded in the history like
        any activity, without the task-queue round trips a provider call needs."""
        return await workflow.execute_local_activity(
            name,
            request,
            result_type=result_type,
            start_to_close_timeout=QUICK,
            retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=1)),
            summary=summary,
        )

    def _awaited(self) -> tuple[str, ...]:
        """The events the instance listens for now, as the progress query and the
        HiloWaitingFor attribute show them: its wait_for's and, until it ends, its exit
        rules'."""
        return () if self.ended else attrs.awaited(self.listening, self.definition)

    def _details(self, details: str) -> None:
        self.details = details
        if self.last_skip is not None:
            details += f"\n\n**Last skipped send:** {self.last_skip}"
        workflow.set_current_details(details)

    def _summary(self, summary: str) -> str:
        """A timer's or activity's summary; the first after a skipped send names it."""
        if self.unmentioned_skip is not None:
            summary = f"{summary} · after {self.unmentioned_skip}"
            self.unmentioned_skip = None
        return summary[:200]

    def _adds_to_audiences(self) -> bool:
        return any(
            isinstance(step, SendStep) and step.adds_to_audience()
            for step, _path in walk_steps(list(self.definition.steps))
        )

    def _show(self, step: AnyStep, status: str, details: str) -> None:
        """What the operator sees: current details and search attributes."""
        self.status = status
        version = self.input.journey.version
        self._details(
            f"**{self.definition.name}** v{version} · step `{step.id}` ({step.type})\n\n{details}"
        )
        if self.input.search_attributes and status in LASTING_STATUSES:
            shown = (step.id, status, self._awaited())
            if shown == self.shown:
                return  # the server holds these already: no history event, no visibility write
            workflow.upsert_search_attributes(
                [
                    attrs.STEP.value_set(step.id),
                    attrs.STATUS.value_set(status),
                    attrs.WAITING_FOR.value_set(list(shown[2])),
                ]
            )
            self.shown = shown

    async def _finish(self, status: InstanceStatus, reason: str | None) -> JourneyResult:
        info = workflow.info()
        self.status = status
        self.listening = set()
        self.ended = True
        self._details(
            f"**{self.definition.name}** v{self.input.journey.version} · {status}"
            + (f": {reason}" if reason else "")
        )
        if self.input.search_attributes:
            updates: list[SearchAttributeUpdate[Any]] = [
                attrs.STATUS.value_set(status),
                attrs.WAITING_FOR.value_set(list(self._awaited())),
            ]
            workflow.upsert_search_attributes(updates)
            self.shown = None
        if (
            status in ("exited", "archived")
            and self._adds_to_audiences()
            and workflow.patched("leave-audiences-on-exit")
        ):
            # An exit (a purchase, a stop) ends the retargeting this journey started.
            await workflow.execute_activity(
                LEAVE_AUDIENCES,
                LeaveAudiencesRequest(
                    customer_id=self.customer_id,
                    reason=f"journey {status}" + (f": {reason}" if reason else ""),
                    workflow_id=info.workflow_id,
                    run_id=self.run_id,
                    scheduled_at=workflow.now(),
                ),
                result_type=LeaveAudiencesResult,
                start_to_close_timeout=timedelta(seconds=self.input.send_timeout_seconds),
                retry_policy=SEND_RETRY,
                summary="leave the ad audiences this journey added",
            )
        await self._activity(
            FINISH,
            FinishRequest(
                workflow_id=info.workflow_id,
                run_id=self.run_id,
                status=status,
                reason=reason,
                ended_at=workflow.now(),
                converted_at=self.state.converted_at,
                revenue=self.state.revenue,
                holdout=status == "holdout",
                trigger_message_id=self.input.trigger.message_id,
            ),
            summary=self._summary(f"{status}" + (f": {reason}" if reason else "")),
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return JourneyResult(
            status=status,
            reason=reason,
            sent=self.state.sent,
            steps=sum(self.state.step_counts.values()),
            converted=self.state.converted_at is not None,
        )


def _mismatches(
    rules: Sequence[EventMatch], event: dict[str, Any], context: dict[str, Any]
) -> list[str]:
    """Why each rule for this event's name left it out on a ``match_trigger`` property."""
    reasons = (
        rule.trigger_mismatch(event, context) for rule in rules if rule.event == event["name"]
    )
    return list(dict.fromkeys(reason for reason in reasons if reason is not None))


def _number(properties: dict[str, Any], path: str) -> float | None:
    try:
        return float(lookup({"properties": properties}, path))
    except (TypeError, ValueError):
        return None  # absent or not a number


def _held(held: TypedSearchAttributes) -> tuple[str, str, tuple[str, ...]] | None:
    step, status = held.get(attrs.STEP), held.get(attrs.STATUS)
    if step is None or status is None:
        return None
    return step, status, tuple(held.get(attrs.WAITING_FOR) or ())


__all__ = ["JourneyWorkflow", "compile_steps"]
