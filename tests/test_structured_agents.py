"""--structured-output: every agent answer parses, on the random demo model, for real HumanEval and
APPS problems, through the in-process engine and through the server's structured_outputs."""

import asyncio

import pytest

pytest.importorskip("xgrammar", reason="structured outputs need xgrammar (not on the GPU image)")

from mcl_runtime import AsyncEngine, Engine
from mcl_runtime.agents.datasets import load_problems
from mcl_runtime.agents.formats import STEPS, answer_grammar, structured_output
from mcl_runtime.agents.judge import Judge
from mcl_runtime.agents.llm import EngineChatClient
from mcl_runtime.agents.mapcoder import MapCoder, MapCoderConfig
from mcl_runtime.agents.parsers import parse_code, parse_plan, parse_retrieval, parse_verification
from mcl_runtime.agents.prompts import AGENTS
from mcl_runtime.agents.sandbox import Limits, Sandbox
from mcl_runtime.demo import demo_adapter_dirs, demo_model_dir

PARSERS = {
    "retrieval": lambda t: parse_retrieval(t, 2),
    "planning": parse_plan,
    "verification": parse_verification,
    "coding": parse_code,
    "debugging": parse_code,
}


@pytest.fixture(scope="module")
def aengine():
    aeng = AsyncEngine(Engine(model=demo_model_dir() / "base", adapters=demo_adapter_dirs(), device="cpu"))
    yield aeng
    aeng.shutdown()


@pytest.mark.parametrize("dataset", ["humaneval", "apps"])
def test_zero_format_failures_on_the_demo_model(aengine, dataset):
    config = MapCoderConfig(k=2, t=1, max_tokens=300, temperature=0.7, structured_output=True)
    solver = MapCoder(EngineChatClient(aengine), Judge(Sandbox(Limits(timeout_s=5))), config)

    async def run():
        return await asyncio.gather(*(solver.solve(p) for p in load_problems(dataset, 2)))

    for traj in asyncio.run(run()):
        assert {c.agent for c in traj.calls} >= {"retrieval", "planning", "coding"}
        assert all(c.error is None and c.finish_reason == "stop" for c in traj.calls)
        assert traj.per_agent("format_failures") == {a: 0 for a in AGENTS}, [
            (c.step, c.text, c.parsed) for c in traj.calls if not c.ok
        ]


@pytest.mark.parametrize("step", STEPS)
def test_each_format_parses_and_fits(aengine, step):
    from mcl_runtime import SamplingParams

    engine = aengine.engine
    params = SamplingParams(max_tokens=300, temperature=1.0, seed=5, n=3, structured=structured_output(step, 300, 2))
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": step}])
    out = asyncio.run(_last(aengine.generate(prompt, params, adapter="coding")))
    for o in out.outputs:
        assert o.finish_reason == "stop" and len(o.text.encode()) <= 299
        assert PARSERS[step](o.text).ok, o.text


async def _last(gen):
    last = None
    async for out in gen:
        last = out
    return last


def test_budget_too_small_is_refused():
    with pytest.raises(ValueError, match="too small"):
        MapCoderConfig(k=3, max_tokens=200, structured_output=True)
    assert "field0" in answer_grammar("coding", 64)
