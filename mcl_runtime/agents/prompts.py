"""The four agents' prompts (chat messages); shared by the pipeline and the training module.

Agents, each served by the LoRA adapter of the same name: ``retrieval`` recalls similar problems
and an algorithm; ``planning`` writes a plan from one recalled problem and also rates plans
(the verification step); ``coding`` writes code for a plan; ``debugging`` repairs code from a
sample-test report. Every inserted piece of model output is cut to a bounded length so prompts
stay bounded however long (or nonsensical) earlier answers were.
"""

from __future__ import annotations

from mcl_runtime.agents.datasets import Problem
from mcl_runtime.agents.judge import FunctionTest, IOTest, TestOutcome
from mcl_runtime.agents.parsers import Exemplar

AGENTS = ("retrieval", "planning", "coding", "debugging")
MAX_EXEMPLAR_FIELD = 2000
MAX_ALGORITHM = 3000
MAX_PLAN = 4000
MAX_CODE = 8000
MAX_REPORT_FIELD = 500
MAX_REPORT = 4000

SYSTEM = {
    "retrieval": "You are the retrieval agent of a team that writes Python programs. You recall "
    "programming problems similar to a given one, solve them, and name the algorithmic "
    "technique they share.",
    "planning": "You are the planning agent of a team that writes Python programs. You write concrete "
    "step-by-step plans for programming problems and judge how likely a plan is to work.",
    "coding": "You are the coding agent of a team that writes Python programs. You turn a plan into "
    "correct, complete Python 3 code.",
    "debugging": "You are the debugging agent of a team that writes Python programs. You find why code "
    "fails its tests and return a corrected version.",
}


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "\n[... cut ...]"


def problem_text(problem: Problem) -> str:
    if problem.style == "function":
        return f"Complete this Python function:\n```python\n{problem.statement.rstrip()}\n```"
    text = problem.statement.rstrip()
    if problem.starter_code:
        text += (
            "\n\nThe task was first posed as this function, which shows the parameters:\n"
            f"```python\n{problem.starter_code}\n```"
        )
    return text


def samples_text(problem: Problem) -> str:
    if not problem.sample_tests:
        return "(none given)"
    parts = []
    for test in problem.sample_tests:
        if isinstance(test, FunctionTest):
            parts.append(test.source.strip())
        elif isinstance(test, IOTest):
            parts.append(f"Input:\n{test.input.rstrip()}\nExpected output:\n{test.expected.rstrip()}")
    return "\n".join(parts) if isinstance(problem.sample_tests[0], FunctionTest) else "\n\n".join(parts)


def style_rules(problem: Problem) -> str:
    if problem.style == "function":
        return (
            "Define the function exactly as named and typed in the problem (helpers are allowed). "
            "The tests import nothing and call it directly, so do not read input, do not print, "
            "and do not add example calls or tests."
        )
    return (
        "Write a complete program that reads the input from standard input and writes the answer "
        "to standard output in exactly the required format, with no prompts or extra messages. "
        "If you write a function, the program must also read the input, call it and print the result."
    )


def _messages(agent: str, user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM[agent]}, {"role": "user", "content": user}]


def retrieval_messages(problem: Problem, k: int) -> list[dict]:
    user = f"""# Target problem
{problem_text(problem)}

# Task
Recall {k} programming problems that resemble the target problem but differ from it and from each other. For each one give a short description, a Python 3 solution explained step by step, and the plan that the solution follows.
Then name the algorithmic technique the target problem calls for (for example brute force, greedy, dynamic programming, divide and conquer, backtracking, binary search, graph search, simulation, math) and write a short general tutorial on it, without code.

# Answer format
Answer with XML only, in exactly this shape, with {k} problem elements:
<root>
<problem>
<description>the recalled problem</description>
<code>its Python 3 solution</code>
<planning>the plan behind that solution</planning>
</problem>
<algorithm>the technique and its tutorial</algorithm>
</root>"""
    return _messages("retrieval", user)


def planning_messages(problem: Problem, exemplar: Exemplar | None, algorithm: str) -> list[dict]:
    if exemplar is None:
        example = "# A similar problem\n(none recalled)\n"
    else:
        example = (
            f"# A similar problem\n{clip(exemplar.description, MAX_EXEMPLAR_FIELD)}\n\n"
            f"# How that problem was planned\n{clip(exemplar.planning, MAX_EXEMPLAR_FIELD)}\n"
        )
    user = f"""{example}
# A technique that may help
{clip(algorithm, MAX_ALGORITHM) or "(none named)"}

# Problem to plan
{problem_text(problem)}

# Sample tests
{samples_text(problem)}

Write a concrete, numbered, step-by-step plan for solving the problem to plan in Python 3, using the similar problem as a guide where it fits. Give only the plan: no code and no other commentary."""
    return _messages("planning", user)


def verification_messages(problem: Problem, plan: str) -> list[dict]:
    user = f"""# Problem
{problem_text(problem)}

# Proposed plan
{clip(plan, MAX_PLAN)}

Decide whether a Python 3 program that follows this plan exactly would solve the problem correctly, edge cases included. Answer with XML only, in exactly this shape:
<root>
<explanation>why the plan does or does not solve the problem</explanation>
<confidence>an integer from 0 (certainly wrong) to 100 (certainly right)</confidence>
</root>"""
    return _messages("planning", user)


def coding_messages(problem: Problem, plan: str, algorithm: str) -> list[dict]:
    user = f"""# A technique that may help
{clip(algorithm, MAX_ALGORITHM) or "(none named)"}

# Problem
{problem_text(problem)}

# Plan
{clip(plan, MAX_PLAN)}

# Sample tests
{samples_text(problem)}

Write Python 3 code that solves the problem by following the plan. {style_rules(problem)}
Reply with the complete code in a single fenced block (```python ... ```) and nothing after it."""
    return _messages("coding", user)


def debugging_messages(problem: Problem, plan: str, code: str, report: str, algorithm: str) -> list[dict]:
    user = f"""# A technique that may help
{clip(algorithm, MAX_ALGORITHM) or "(none named)"}

# Problem
{problem_text(problem)}

# Current plan
{clip(plan, MAX_PLAN)}

# Current code
```python
{clip(code, MAX_CODE)}
```

# Test report
{report}

The code fails the sample tests above. Work out why, revise the plan where it is wrong, and fix the code. {style_rules(problem)}
First state the revised plan briefly, then give the complete corrected code in a single fenced block (```python ... ```)."""
    return _messages("debugging", user)


def test_report(outcomes: list[TestOutcome], style: str) -> str:
    """The sample-test results as the debugging agent sees them, each field and the whole bounded."""
    label = "Input:\n" if style == "stdio" else ""
    parts = []
    for i, o in enumerate(outcomes, start=1):
        shown = label + clip(o.input, MAX_REPORT_FIELD)
        if o.passed:
            parts.append(f"Test {i}: passed\n{shown}")
            continue
        lines = [f"Test {i}: failed ({o.verdict.value})", shown]
        if o.expected:
            lines.append(f"Expected:\n{clip(o.expected, MAX_REPORT_FIELD)}")
        if o.actual:
            lines.append(f"Actual:\n{clip(o.actual, MAX_REPORT_FIELD)}")
        if o.error:
            lines.append(f"Error:\n{clip(o.error[-MAX_REPORT_FIELD:], MAX_REPORT_FIELD)}")
        parts.append("\n".join(lines))
    return clip("\n\n".join(parts), MAX_REPORT) if parts else "(no sample tests)"
