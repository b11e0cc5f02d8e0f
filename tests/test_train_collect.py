"""``train collect`` and ``train correct`` against stub teacher and supervisor models, on
self-written function problems whose outcome the stubs fix in advance (k=1, t=1):

    add     good answers                                    passes
    weird   the planning reply is unreadable (no choices)   passes; that call is discarded
    sub     wrong code, wrong fix                           fails; supervisor fixes the debugging step
    absval  code passes the samples, fails hidden tests     fails; supervisor fixes the plan
    mul     retrieval answer does not parse                 passes; retrieval discarded
    neg     wrong code, the debugging round fixes it        passes
    div     retrieval does not parse, wrong code            fails; corrected retrieval, re-run fails
    garb    wrong code, wrong fix                           fails; supervisor answer does not parse

The stubs run in process (injected clients) and behind a local HTTP server (the command line, whose
output then trains one LoRA per agent).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mcl_runtime import Engine
from mcl_runtime.agents import formats
from mcl_runtime.agents.datasets import load_problems
from mcl_runtime.agents.llm import ChatReply
from mcl_runtime.agents.mapcoder import MapCoderConfig
from mcl_runtime.agents.prompts import AGENTS, SYSTEM
from mcl_runtime.demo import demo_model_dir
from mcl_runtime.train.__main__ import main
from mcl_runtime.train.clients import TolerantClient
from mcl_runtime.train.collect import CollectOptions, collect
from mcl_runtime.train.correct import CorrectOptions, correct
from mcl_runtime.train.data import read_examples

pytest.importorskip("openai", reason="train.clients.TolerantClient imports openai for every client")

PROTOCOL = MapCoderConfig(k=1, t=1, max_tokens=256, test_last_fix=True)
# name: (arguments, sample (args, result), hidden cases, retrieval parses, code body, debugging body)
PROBLEMS = {
    "add": ("a, b", ("1, 2", 3), [("2, 3", 5), ("-1, 1", 0)], True, "return a + b", None),
    "weird": ("x", ("1", 2), [("5", 6)], True, "return x + 1", None),
    "sub": ("a, b", ("5, 2", 3), [("7, 3", 4)], True, "return a + b", "return a + b"),
    "absval": ("x", ("3", 3), [("3", 3), ("-2", 2)], True, "return x", None),
    "mul": ("a, b", ("2, 3", 6), [("4, 5", 20)], False, "return a * b", None),
    "neg": ("x", ("2", -2), [("3", -3)], True, "return x", "return -x"),
    "div": ("a, b", ("6, 3", 2), [("7, 2", 3)], False, "return a * b", "return a * b"),
    "garb": ("x", ("2", 4), [("3", 6)], True, "return 0", "return 0"),
}
NAME = re.compile(rf"def ({'|'.join(PROBLEMS)})\(")
GOOD_RETRIEVAL = (
    "<root>\n<problem>\n<description>Combine two numbers.</description>\n<code>def f(a, b):\n"
    "    return a + b</code>\n<planning>1. Combine them.</planning>\n</problem>\n"
    "<algorithm>Arithmetic: apply the operation directly.</algorithm>\n</root>"
)
FIXED_PLAN = "1. If x is NEGATIVE, return -x.\n2. Otherwise return x."
SUPERVISOR_MODEL = "boss"


def _record(name: str) -> dict:
    args, (sample_args, sample_result), hidden, *_ = PROBLEMS[name]
    checks = "".join(f"    assert candidate({a}) == {r}\n" for a, r in hidden)
    return {
        "task_id": f"T/{name}",
        "prompt": f'def {name}({args}):\n    """Compute {name}."""\n',
        "entry_point": name,
        "test": f"def check(candidate):\n{checks}",
        "sample_io": [f"assert {name}({sample_args}) == {sample_result}"],
    }


@pytest.fixture(scope="module")
def problem_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    path.write_text("".join(json.dumps(_record(n)) + "\n" for n in PROBLEMS))
    return path


@pytest.fixture(scope="module")
def problems(problem_file):
    return load_problems(str(problem_file))


def _code(name: str, body: str) -> str:
    return f"```python\ndef {name}({PROBLEMS[name][0]}):\n    {body}\n```"


def teacher_answer(agent: str, messages: list[dict]) -> str | None:
    """The teacher's answer; None stands for an unreadable reply."""
    assert messages[0]["content"] == SYSTEM[agent]
    user = messages[-1]["content"]
    name = NAME.search(user).group(1)
    _, _, _, retrieval_ok, code, fix = PROBLEMS[name]
    if agent == "retrieval":
        return GOOD_RETRIEVAL if retrieval_ok else "Sorry, nothing similar comes to mind."
    if agent == "planning" and "# Proposed plan" in user:
        return "<root>\n<explanation>Looks right.</explanation>\n<confidence>90</confidence>\n</root>"
    if agent == "planning":
        return None if name == "weird" else "1. Read the arguments.\n2. Compute the result."
    if agent == "coding":
        return _code(name, "return x if x >= 0 else -x" if FIXED_PLAN in user else code)
    return "Revised plan: same.\n" + _code(name, fix)


def supervisor_answer(messages: list[dict]) -> str:
    user = messages[-1]["content"]
    name = NAME.search(user).group(1)
    if "# The retrieval agent's instructions" in user:
        return GOOD_RETRIEVAL
    if "# The planning agent's instructions" in user:
        return FIXED_PLAN
    return "Subtract instead.\n" + _code(name, "return a - b") if name == "sub" else "I don't know."


class Interrupted(BaseException):
    """Stands for a kill: not an ``Exception``, so it stops the whole run."""


class StubTeacher:
    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls, self.interrupt_at = 0, interrupt_at

    async def chat(
        self, agent: str, messages: list[dict], max_tokens: int, temperature: float, session: str | None = None
    ) -> ChatReply:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise Interrupted
        await asyncio.sleep(0)
        text = teacher_answer(agent, messages)
        if text is None:
            raise TypeError("'NoneType' object is not subscriptable")  # what the openai client raises
        return ChatReply(text, 10, 10, "stop")


class StubSupervisor(StubTeacher):
    async def chat(
        self, agent: str, messages: list[dict], max_tokens: int, temperature: float, session: str | None = None
    ) -> ChatReply:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise Interrupted
        return ChatReply(supervisor_answer(messages), 10, 10, "stop")


TEACHER_LABELS = {a: f"stub-{a}" for a in AGENTS}


def _collect(problems, out: Path, teacher: StubTeacher, workers: int = 1, **options) -> dict:
    return asyncio.run(
        collect(
            problems, TolerantClient(teacher), out, TEACHER_LABELS, CollectOptions(PROTOCOL, workers=workers, **options)
        )
    )


def _correct(problems, collected: Path, out: Path, supervisor: StubSupervisor, workers: int = 1) -> dict:
    return asyncio.run(
        correct(
            problems,
            collected,
            TolerantClient(StubTeacher()),
            TolerantClient(supervisor),
            out,
            "stub-supervisor",
            CorrectOptions(workers=workers),
        )
    )


def _outputs(folder: Path) -> dict[str, str]:
    return {name: (folder / name).read_text() for name in [f"{a}.jsonl" for a in AGENTS] + ["stats.json"]}


@pytest.fixture(scope="module")
def collected(problems, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("collected")
    return out, _collect(problems, out, StubTeacher())


@pytest.fixture(scope="module")
def corrected(problems, collected, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corrected")
    return out, _correct(problems, collected[0], out, StubSupervisor())


# ---------------------------------------------------------------- collect


def test_collect_keeps_passing_trajectories_only(collected) -> None:
    out, stats = collected
    assert stats["errors"] == [] and stats["pending"] == 0
    assert (stats["trajectories"], stats["passed"], stats["failed"]) == (8, 4, 4)
    agents = stats["agents"]
    assert {a: agents[a]["kept"] for a in AGENTS} == {"retrieval": 3, "planning": 7, "coding": 4, "debugging": 1}
    assert agents["retrieval"]["discarded"] == {
        "failed trajectory": 4,
        "format failure: missing recalled problems and algorithm": 1,
    }
    assert agents["planning"]["discarded"] == {"failed trajectory": 8, "refused request": 1}
    assert agents["debugging"]["discarded"] == {"failed trajectory": 3}
    examples = {a: read_examples(out / f"{a}.jsonl") for a in AGENTS}
    assert [e["task_id"] for e in examples["coding"]] == ["T/add", "T/weird", "T/mul", "T/neg"]
    assert [e["task_id"] for e in examples["debugging"]] == ["T/neg"]
    assert "return -x" in examples["debugging"][0]["messages"][-1]["content"]
    steps = [e["step"] for e in examples["planning"]]
    assert steps.count("verification") == 4 and steps.count("planning") == 3
    first = examples["coding"][0]
    assert first["messages"][0] == {"role": "system", "content": SYSTEM["coding"]}
    assert first["messages"][-1]["role"] == "assistant" and "return a + b" in first["messages"][-1]["content"]
    assert (first["trajectory_id"], first["round"], first["teacher"], first["source"]) == (
        "T/add#0",
        0,
        "stub-coding",
        "collect",
    )


def test_collect_drop_failed_code(problems, collected, tmp_path) -> None:
    stats = _collect(problems, tmp_path, StubTeacher(), drop_failed_code=True)
    assert stats["agents"]["coding"]["kept"] == 3
    assert stats["agents"]["coding"]["discarded"]["code failed the sample tests"] == 1


def test_collect_resume_after_interruption_gives_the_same_files(problems, collected, tmp_path) -> None:
    teacher = StubTeacher(interrupt_at=14)
    with pytest.raises(Interrupted):
        _collect(problems, tmp_path, teacher, workers=2)
    store = tmp_path / "trajectories.jsonl"
    done = store.read_text().count("\n")
    assert 0 < done < len(PROBLEMS)
    with open(store, "a") as f:
        f.write('{"trajectory_id": "T/torn#0", "task_')  # killed in the middle of a write
    resumed = StubTeacher()
    stats = _collect(problems, tmp_path, resumed, workers=2)
    assert stats["pending"] == 0 and stats["trajectories"] == len(PROBLEMS)
    assert resumed.calls < 36  # the finished trajectories were not asked again
    assert _outputs(tmp_path) == _outputs(collected[0])
    assert _collect(problems, tmp_path, StubTeacher(interrupt_at=1))["trajectories"] == len(PROBLEMS)


def test_collect_refuses_to_resume_with_other_settings(problems, collected) -> None:
    with pytest.raises(ValueError, match="other settings"):
        asyncio.run(
            collect(
                problems,
                StubTeacher(),
                collected[0],
                TEACHER_LABELS,
                CollectOptions(MapCoderConfig(k=2, t=1, test_last_fix=True)),
            )
        )


# ---------------------------------------------------------------- correct


def test_correct_keeps_a_corrected_step_only_when_the_rerun_passes(corrected, collected) -> None:
    out, stats = corrected
    assert stats["errors"] == [] and stats["pending"] == 0 and stats["failed_trajectories"] == 4
    assert stats["outcomes"] == {"kept": 2, "re-run failed": 1, "supervisor answer did not parse": 1}
    agents = stats["agents"]
    assert agents["debugging"] == {"kept": 1, "discarded": {"supervisor answer did not parse": 1}}
    assert agents["planning"] == {"kept": 1, "discarded": {}}
    assert agents["retrieval"] == {"kept": 0, "discarded": {"re-run failed": 1}}
    (fix,) = read_examples(out / "debugging.jsonl")
    assert fix["task_id"] == "T/sub" and "return a - b" in fix["messages"][-1]["content"]
    assert (fix["source"], fix["supervisor"], fix["teacher"], fix["call_index"]) == (
        "correct",
        "stub-supervisor",
        "stub-debugging",
        4,
    )
    original = [json.loads(line) for line in (collected[0] / "trajectories.jsonl").read_text().splitlines()]
    sub = next(r for r in original if r["task_id"] == "T/sub")
    assert fix["messages"][:-1] == sub["trajectory"]["calls"][4]["messages"]
    (plan,) = read_examples(out / "planning.jsonl")
    assert (plan["task_id"], plan["step"], plan["messages"][-1]["content"]) == ("T/absval", "planning", FIXED_PLAN)
    records = {r["task_id"]: r for r in map(json.loads, (out / "corrections.jsonl").read_text().splitlines())}
    assert "passes the sample tests but fails the hidden tests" in records["T/absval"]["feedback"]
    assert "failed (wrong answer)" in records["T/sub"]["feedback"]
    assert records["T/sub"]["rerun"]["passed"] and not records["T/div"]["rerun"]["passed"]
    assert records["T/div"]["step"] == "retrieval" and "missing" in records["T/div"]["feedback"]


def test_correct_resume_after_interruption_gives_the_same_files(problems, collected, corrected, tmp_path) -> None:
    with pytest.raises(Interrupted):
        _correct(problems, collected[0], tmp_path, StubSupervisor(interrupt_at=3))
    assert (tmp_path / "corrections.jsonl").read_text().count("\n") == 2
    supervisor = StubSupervisor()
    stats = _correct(problems, collected[0], tmp_path, supervisor, workers=2)
    assert supervisor.calls == 2 and stats["pending"] == 0
    assert _outputs(tmp_path) == _outputs(corrected[0])


# ---------------------------------------------------------------- over HTTP, from the command line


class _Handler(BaseHTTPRequestHandler):
    bodies: list[dict] = []  # every chat request received

    def log_message(self, *args) -> None:
        pass

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": m, "object": "model"} for m in [*AGENTS, SUPERVISOR_MODEL]]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(request)
        model, messages = request["model"], request["messages"]
        text = supervisor_answer(messages) if model == SUPERVISOR_MODEL else teacher_answer(model, messages)
        if text is None:
            return self._send({"id": "x", "object": "chat.completion", "model": model})  # no choices
        self._send(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
            }
        )


@pytest.fixture(scope="module")
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_cli_collect_correct_sft_over_http(stub_server, problem_file, collected, corrected, tmp_path, capsys) -> None:
    common = ["--workers", "2", "--no-progress"]
    assert (
        main(
            [
                "collect",
                "--problems",
                str(problem_file),
                "--teacher",
                stub_server,
                "--out",
                str(tmp_path / "c"),
                "--k",
                "1",
                "--t",
                "1",
                "--max-tokens",
                "256",
                *common,
            ]
        )
        == 0
    )
    stats = json.loads((tmp_path / "c" / "stats.json").read_text())
    assert stats == {k: v for k, v in collected[1].items() if k != "errors"}
    example = read_examples(tmp_path / "c" / "coding.jsonl")[0]
    assert example["teacher"] == f"coding@{stub_server}"
    assert (
        main(
            [
                "correct",
                "--collected",
                str(tmp_path / "c"),
                "--supervisor",
                stub_server,
                "--supervisor-model",
                SUPERVISOR_MODEL,
                "--out",
                str(tmp_path / "f"),
                *common,
            ]
        )
        == 0
    )
    stats = json.loads((tmp_path / "f" / "stats.json").read_text())
    assert stats == {k: v for k, v in corrected[1].items() if k != "errors"}
    assert (
        main(
            [
                "sft",
                "--base",
                str(demo_model_dir() / "base"),
                "--data-dir",
                str(tmp_path / "c"),
                "--data-dir",
                str(tmp_path / "f"),
                "--out",
                str(tmp_path / "lora"),
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--rank",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    adapters = {a: str(tmp_path / "lora" / a) for a in AGENTS}
    assert sorted(Engine(str(demo_model_dir() / "base"), adapters=adapters, device="cpu").adapters) == sorted(AGENTS)
    capsys.readouterr()
    assert (
        main(
            [
                "correct",
                "--collected",
                str(tmp_path / "nowhere"),
                "--supervisor",
                stub_server,
                "--supervisor-model",
                SUPERVISOR_MODEL,
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 2
    )
    assert "not a collect output folder" in capsys.readouterr().err


def test_cli_collect_structured_output_sends_each_step_its_grammar(stub_server, problem_file, tmp_path) -> None:
    """``--structured-output``: every teacher call carries vLLM's ``structured_outputs`` with the grammar
    of its step's format (the pipeline's), and the run records it so that a resume must match."""
    args = ["collect", "--problems", str(problem_file), "--teacher", stub_server, "--out", str(tmp_path / "c")]
    args += ["--k", "1", "--t", "1", "--max-tokens", "256", "--no-progress", "--limit", "2"]
    _Handler.bodies.clear()
    assert main([*args, "--structured-output"]) == 0
    grammars = {formats.structured_output(step, 256, 1)["grammar"] for step in formats.STEPS}
    sent = [body.get("structured_outputs", {}).get("grammar") for body in _Handler.bodies]
    assert sent and all(g in grammars for g in sent), sent
    assert len(set(sent)) >= 4  # retrieval, planning, verification, coding at least
    settings = json.loads((tmp_path / "c" / "collect.json").read_text())
    assert settings["mapcoder"]["structured_output"] is True
    assert main(args) == 2  # resuming without the flag is another protocol


class FlakyTeacher(StubTeacher):
    """Unreachable for one problem (a transport failure, not a malformed answer)."""

    async def chat(
        self, agent: str, messages: list[dict], max_tokens: int, temperature: float, session: str | None = None
    ) -> ChatReply:
        if "def add(" in messages[-1]["content"]:
            raise ConnectionError("teacher unreachable")
        return await super().chat(agent, messages, max_tokens, temperature)


def test_a_problem_whose_teacher_fails_is_left_for_the_next_run(problems, tmp_path) -> None:
    two = problems[:2]
    stats = _collect(two, tmp_path, FlakyTeacher())
    assert stats["pending"] == 1 and stats["trajectories"] == 1 and "teacher unreachable" in stats["errors"][0]
    stats = _collect(two, tmp_path, StubTeacher())
    assert stats["pending"] == 0 and stats["passed"] == 2 and stats["errors"] == []


def test_teacher_endpoints_per_agent_from_the_command_line() -> None:
    from mcl_runtime.train.__main__ import build_parser, endpoints_from_args

    args = build_parser().parse_args(
        [
            "collect",
            "--problems",
            "p.jsonl",
            "--out",
            "o",
            "--teacher",
            "http://a/v1",
            "--teacher-model",
            "big",
            "--agent-teacher",
            "debugging=http://b/v1",
            "--agent-model",
            "debugging=fixer",
        ]
    )
    endpoints = endpoints_from_args(args)
    assert endpoints["coding"].label("coding") == "big@http://a/v1"
    assert endpoints["debugging"].label("debugging") == "fixer@http://b/v1"
    with pytest.raises(SystemExit, match="unknown agent"):
        endpoints_from_args(
            build_parser().parse_args(
                ["collect", "--problems", "p", "--out", "o", "--teacher", "http://a/v1", "--agent-model", "judge=x"]
            )
        )
