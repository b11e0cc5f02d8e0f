"""The MapCoder protocol (which MapCoder-Lite keeps), one problem at a time, with a call budget.

1. retrieval: one call recalls k similar problems (description, code, plan) and an algorithm.
2. planning: per recalled problem, a plan for the target problem and a verification call that
   rates it (confidence 0-100); plans are then tried best-first (ties keep recall order).
3. coding: code for the current plan.
4. debugging, as MapCoder's loop does it: up to t rounds of "run the code on the sample tests;
   if it fails, ask for a fix given the test report", so the t-th fix is never tested; then the
   next plan. The first code that passes the samples is final, otherwise the last code written
   (which may be that untested fix). ``test_last_fix`` (``--test-last-fix``) is our variant:
   every fix is tested, the samples run t + 1 times per plan, the call count is the same.
The hidden tests are not run here (see ``evaluate.py``). Every call is kept in a ``Trajectory``
(messages, answer text, parse result, tokens), which is what the training module collects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from mcl_runtime.agents import formats, prompts
from mcl_runtime.agents.datasets import Problem
from mcl_runtime.agents.judge import Judge, TestOutcome
from mcl_runtime.agents.llm import ChatClient, ChatError, ChatReply
from mcl_runtime.agents.parsers import (
    CodeParse,
    Exemplar,
    Parsed,
    RetrievalParse,
    parse_code,
    parse_debugging,
    parse_plan,
    parse_retrieval,
    parse_verification,
)
from mcl_runtime.agents.prompts import AGENTS
from mcl_runtime.agents.sandbox import Limits

# (k, t) of MapCoder's published runs (Islam et al., ACL 2024, and its repository's run scripts):
# HumanEval k=5; every other dataset k=3; t=5 everywhere. HumanEval-ET is the HumanEval run judged
# on the extended tests, so it has HumanEval's settings.
PUBLISHED_K_T = {"humaneval": (5, 5), "humaneval-et": (5, 5)}
DEFAULT_K_T = (3, 5)
MAPCODER_MAX_TOKENS = 4096


def published_k_t(dataset: str) -> tuple[int, int]:
    """MapCoder's (k, t) for a built-in dataset name; (3, 5) for anything else."""
    return PUBLISHED_K_T.get(dataset, DEFAULT_K_T)


@dataclass(frozen=True)
class MapCoderConfig:
    k: int = 3  # recalled problems, hence plans
    t: int = 5  # debugging rounds per plan
    max_tokens: int = MAPCODER_MAX_TOKENS  # per call
    temperature: float = 0.0
    max_calls: int | None = None  # default: the protocol's own maximum, 1 + 2k + k(1 + t)
    structured_output: bool = False  # constrain every answer to its format (agents/formats.py)
    test_last_fix: bool = False  # our variant of the debugging loop (see the module docstring)

    @property
    def loop(self) -> str:
        return "test-last-fix" if self.test_last_fix else "mapcoder"

    def __post_init__(self) -> None:
        if self.k < 1 or self.t < 0 or self.max_tokens < 1 or self.temperature < 0:
            raise ValueError(f"need k >= 1, t >= 0, max_tokens >= 1, temperature >= 0: {self}")
        if self.max_calls is not None and self.max_calls < 1:
            raise ValueError(f"max_calls must be at least 1, got {self.max_calls}")
        if self.structured_output:
            for step in formats.STEPS:
                formats.answer_grammar(step, self.max_tokens, self.k)  # raises when max_tokens is too small

    @property
    def call_budget(self) -> int:
        return self.max_calls if self.max_calls is not None else 1 + 2 * self.k + self.k * (1 + self.t)


@dataclass
class AgentCall:
    """One model call: what the trainer keeps."""

    agent: str  # the adapter: retrieval | planning | coding | debugging
    step: str  # retrieval | planning | verification | coding | debugging
    messages: list[dict]
    text: str
    parsed: dict  # the parser's result as a dict (``ok`` False = format failure)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    seconds: float
    error: str | None = None  # the backend refused the request

    @property
    def ok(self) -> bool:
        return bool(self.parsed.get("ok")) and self.error is None


@dataclass
class SampleRun:
    after_call: int  # index in ``calls`` of the call that produced the code
    code: str
    outcomes: list[TestOutcome]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)


@dataclass
class RankedPlan:
    plan: str
    confidence: int
    exemplar: int | None  # index of the recalled problem it came from


@dataclass
class Trajectory:
    task_id: str
    calls: list[AgentCall] = field(default_factory=list)
    sample_runs: list[SampleRun] = field(default_factory=list)
    plans: list[RankedPlan] = field(default_factory=list)
    final_code: str = ""
    samples_passed: bool = False
    budget_exhausted: bool = False

    def per_agent(self, what: str) -> dict:
        """``calls``, ``format_failures`` or ``tokens`` ({"prompt", "completion"}) per agent."""
        if what == "tokens":
            return {
                a: {
                    "prompt": sum(c.prompt_tokens for c in self.calls if c.agent == a),
                    "completion": sum(c.completion_tokens for c in self.calls if c.agent == a),
                }
                for a in AGENTS
            }
        if what == "calls":
            return {a: sum(c.agent == a for c in self.calls) for a in AGENTS}
        if what == "format_failures":
            return {a: sum(c.agent == a and not c.ok for c in self.calls) for a in AGENTS}
        raise ValueError(f"unknown per-agent quantity {what!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for run, raw in zip(self.sample_runs, d["sample_runs"]):
            raw["outcomes"] = [o.to_dict() for o in run.outcomes]
        return d


class BudgetExhausted(Exception):
    pass


class MapCoder:
    """Solves problems with the four agents through ``client``, testing code with ``judge``."""

    def __init__(self, client: ChatClient, judge: Judge, config: MapCoderConfig | None = None) -> None:
        self.client = client
        self.judge = judge
        self.config = config or MapCoderConfig()

    def limits_for(self, problem: Problem) -> Limits:
        base = self.judge.sandbox.limits
        if problem.time_limit_s is None or problem.time_limit_s <= base.timeout_s:
            return base
        return replace(base, timeout_s=problem.time_limit_s)

    async def solve(self, problem: Problem) -> Trajectory:
        traj = Trajectory(problem.task_id)
        try:
            retrieved = await self._retrieve(problem, traj)
            traj.plans = await self._plan(problem, retrieved, traj)
            await self._code_and_debug(problem, retrieved.algorithm, traj)
        except BudgetExhausted:
            traj.budget_exhausted = True
        last = traj.sample_runs[-1] if traj.sample_runs else None
        traj.samples_passed = last is not None and last.code == traj.final_code and last.passed
        return traj

    async def _call(
        self, traj: Trajectory, agent: str, step: str, messages: list[dict], parser: Callable[[str], Parsed]
    ) -> Parsed:
        if len(traj.calls) >= self.config.call_budget:
            raise BudgetExhausted
        start, error = time.monotonic(), None
        try:
            extra = (
                {"structured": formats.structured_output(step, self.config.max_tokens, self.config.k)}
                if self.config.structured_output
                else {}
            )
            reply = await self.client.chat(
                agent, messages, self.config.max_tokens, self.config.temperature, session=traj.task_id, **extra
            )
        except ChatError as exc:
            reply, error = ChatReply("", 0, 0, None), str(exc)
        parsed = parser(reply.text)
        traj.calls.append(
            AgentCall(
                agent,
                step,
                messages,
                reply.text,
                parsed.to_dict(),
                reply.prompt_tokens,
                reply.completion_tokens,
                reply.finish_reason,
                time.monotonic() - start,
                error,
            )
        )
        return parsed

    async def _retrieve(self, problem: Problem, traj: Trajectory) -> RetrievalParse:
        k = self.config.k
        return await self._call(
            traj,
            "retrieval",
            "retrieval",
            prompts.retrieval_messages(problem, k),
            lambda text: parse_retrieval(text, k),
        )

    async def _plan(self, problem: Problem, retrieved: RetrievalParse, traj: Trajectory) -> list[RankedPlan]:
        exemplars: list[Exemplar | None] = list(retrieved.exemplars) or [None]
        plans = []
        try:
            for index, exemplar in enumerate(exemplars):
                messages = prompts.planning_messages(problem, exemplar, retrieved.algorithm)
                plan = (await self._call(traj, "planning", "planning", messages, parse_plan)).plan
                rating = await self._call(
                    traj, "planning", "verification", prompts.verification_messages(problem, plan), parse_verification
                )
                plans.append(RankedPlan(plan, rating.confidence, None if exemplar is None else index))
        finally:
            plans.sort(key=lambda p: -p.confidence)
            traj.plans = plans
        return plans

    async def _code_and_debug(self, problem: Problem, algorithm: str, traj: Trajectory) -> None:
        for ranked in traj.plans:
            messages = prompts.coding_messages(problem, ranked.plan, algorithm)
            traj.final_code = (await self._call(traj, "coding", "coding", messages, parse_code)).code
            if await self._debug(problem, ranked.plan, algorithm, traj):
                return

    async def _debug(self, problem: Problem, plan: str, algorithm: str, traj: Trajectory) -> bool:
        """Up to t rounds of test-then-fix on ``traj.final_code``; True once the samples pass."""
        for _ in range(self.config.t):
            run = await self._test_samples(problem, traj.final_code, traj)
            if run.passed:
                return True
            messages = prompts.debugging_messages(
                problem, plan, traj.final_code, prompts.test_report(run.outcomes, problem.style), algorithm
            )
            fix: CodeParse = await self._call(traj, "debugging", "debugging", messages, parse_debugging)
            traj.final_code, plan = fix.code or traj.final_code, fix.notes or plan
        if self.config.test_last_fix:
            return (await self._test_samples(problem, traj.final_code, traj)).passed
        return False

    async def _test_samples(self, problem: Problem, code: str, traj: Trajectory) -> SampleRun:
        earlier = [r for r in traj.sample_runs if r.code == code]
        if earlier:
            outcomes = earlier[-1].outcomes
        else:
            outcomes = await self.judge.arun_tests(
                problem.program(code), list(problem.sample_tests), limits=self.limits_for(problem)
            )
        run = SampleRun(len(traj.calls) - 1, code, outcomes)
        traj.sample_runs.append(run)
        return run
