"""The step loop: overlapped steps (launch N + 1, then process N) give exactly the tokens, text and
finish reasons of synchronous steps; outputs are snapshots whose text is built when read."""

import asyncio

import numpy as np
import pytest

from mcl_runtime import AsyncEngine, Engine, SamplingParams
from mcl_runtime.demo import demo_adapter_dirs, demo_model_dir
from mcl_runtime.engine.adapter_manager import BASE_UID
from mcl_runtime.engine.params import SamplingParams as SP
from mcl_runtime.engine.seq_table import LENGTH, NOT_FINISHED, STOPPED, SequenceTable

PROMPTS = ["def fibonacci(n):\n", "import os\n", "x = 1\n", "class A:\n"] * 3
ADAPTERS = ["coding", None, "planning", "debugging"] * 3
PARAMS = [
    SamplingParams(max_tokens=30, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=1.0, seed=5, n=3),
    SamplingParams(max_tokens=25, stop=["e"]),
    SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, stop=["in", "\n\n"], stop_token_ids=[10]),
] * 3


def _engine(overlap: bool, **kwargs) -> Engine:
    return Engine(
        model=demo_model_dir() / "base", adapters=demo_adapter_dirs(), device="cpu", overlap=overlap, **kwargs
    )


def _results(outs):
    return [[(o.token_ids, o.text, o.finish_reason) for o in out.outputs] for out in outs]


@pytest.fixture(scope="module")
def sync_results():
    return _results(_engine(False, kv_cache_blocks=512, block_size=4).generate(PROMPTS, PARAMS, adapter=ADAPTERS))


@pytest.mark.parametrize(
    "knobs",
    [
        dict(kv_cache_blocks=512, block_size=4),
        dict(kv_cache_blocks=24, block_size=4),  # preemption
        dict(kv_cache_blocks=512, block_size=4, max_num_batched_tokens=5),
    ],
    ids=["plain", "preempt", "chunked"],
)
def test_overlap_gives_the_same_outputs(sync_results, knobs):
    engine = _engine(True, **knobs)
    assert _results(engine.generate(PROMPTS, PARAMS, adapter=ADAPTERS)) == sync_results
    if knobs["kv_cache_blocks"] == 24:
        assert engine.stats()["num_preemptions"] > 0
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.scheduler.running


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_step_outputs_are_snapshots(overlap):
    """Outputs kept unread while the engine goes on still show their own step's tokens and text."""
    engine = _engine(overlap, kv_cache_blocks=256)
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True), "coding")
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=12, stop=["\n"], ignore_eos=True), None)
    kept = {"a": [], "b": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            kept[out.request_id].append(out)
    for rid, outs in kept.items():
        final = outs[-1]
        assert final.finished and all(not o.finished for o in outs[:-1])
        lengths = [len(o.token_ids) for o in outs]
        assert lengths == list(range(1, len(outs) + 1))
        assert all(final.token_ids[: len(o.token_ids)] == o.token_ids for o in outs)
        assert all(final.text.startswith(o.text) for o in outs)
        if rid == "a":
            assert final.text == engine.tokenizer.decode(final.token_ids)
        else:
            assert "\n" not in "".join(o.text for o in outs)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_streamed_text_equals_final_and_never_shows_a_stop(overlap):
    engine = _engine(overlap, kv_cache_blocks=256)
    stops = ["in", "e\n"]
    params = SamplingParams(max_tokens=40, temperature=0.9, seed=11, stop=stops, n=2)
    final = engine.generate([PROMPTS[0]], params, adapter=["planning"])[0]

    async def stream():
        aeng = AsyncEngine(engine)
        try:
            return [[o.text for o in out.outputs] async for out in aeng.generate(PROMPTS[0], params, "planning")]
        finally:
            aeng.shutdown()

    snapshots = asyncio.run(stream())
    for i, o in enumerate(final.outputs):
        texts = [s[i] for s in snapshots if len(s) > i]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
        assert texts[-1] == o.text
        assert not any(stop in t for t in texts for stop in stops)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_abort_between_steps_frees_everything(overlap):
    engine = _engine(overlap, kv_cache_blocks=256)
    for i in range(4):
        engine.add_request(str(i), PROMPTS[i], SamplingParams(max_tokens=50, ignore_eos=True, n=2), ADAPTERS[i])
    for _ in range(5):
        engine.step()
    for i in range(4):
        engine.abort_request(str(i))
    while engine.has_unfinished_requests():
        assert engine.step() == []
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.scheduler.running


def test_a_row_reused_while_its_old_token_is_in_flight_gets_none_of_it():
    """With overlap, a request aborted after its step was launched frees its table row; a request
    added then takes that row, and the in-flight token of the old one must not reach it."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = _engine(False).generate([PROMPTS[1]], params, adapter=ADAPTERS[1])[0].outputs[0].token_ids
    engine = _engine(True)
    engine.add_request("old", PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True), ADAPTERS[0])
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    row = engine.scheduler.requests["old"].seqs[0].row
    engine.abort_request("old")
    engine.add_request("new", PROMPTS[1], params, ADAPTERS[1])
    assert engine.scheduler.requests["new"].seqs[0].row == row
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step())
    assert outs["new"].outputs[0].token_ids == alone and "old" not in outs


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_the_table_agrees_with_the_sequences_at_every_step(overlap):
    """The scheduler's table columns (rows, adapter slots, token counts, in-flight samples) agree
    with the sequences, the adapter manager and the block manager after every step, through
    arrivals, forks, preemption and aborts."""
    engine = _engine(overlap, kv_cache_blocks=24, block_size=4)
    scheduler, table, bm = engine.scheduler, engine.table, engine.block_manager

    def check() -> None:
        seqs = [s for req in scheduler.requests.values() for s in req.seqs if not s.finished]
        running = [s for s in seqs if s.status.value == "running"]
        assert sorted(scheduler.running) == sorted(s.row for s in running)
        for s in seqs:
            row = s.row
            assert table.seqs[row] is s and table.seq_id[row] == s.seq_id
            assert len(s.token_ids) == table.num_prompt[row] + table.num_out[row]
            assert 0 <= table.num_sampled[row] - table.num_out[row] <= (1 if overlap else 0)
            assert table.num_computed[row] <= table.num_tokens(row)
        for s in running:
            uid = s.request.adapter_uid
            slot = -1 if uid == BASE_UID else engine.adapter_manager._slot_of[uid]
            assert table.slot[s.row] == slot
            assert bm.get_num_tokens(s.seq_id) == table.num_computed[s.row]

    ids = [engine.add_request(None, p, sp, a) for p, sp, a in zip(PROMPTS[:4], PARAMS, ADAPTERS)]
    for step in range(400):
        if step == 6:
            engine.abort_request(ids[0])
        if step == 9:
            ids += [engine.add_request(None, p, sp, a) for p, sp, a in zip(PROMPTS[4:], PARAMS[4:], ADAPTERS[4:])]
        engine.step()
        check()
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    assert engine.stats()["num_preemptions"] > 0


def test_sequence_table_finish_check():
    table = SequenceTable(vocab_size=100, eos_token_ids=[99], capacity=2)
    rows = np.array(
        [
            table.add(SP(max_tokens=3), 3, 0, False),
            table.add(SP(max_tokens=5, ignore_eos=True, stop_token_ids=[7, 8, 9]), 5, 1, False),
            table.add(SP(max_tokens=1), 1, 2, False),
        ]
    )  # grows past the capacity
    assert table.record(rows, np.array([99, 99, 5])).tolist() == [STOPPED, NOT_FINISHED, LENGTH]
    assert table.record(rows[:2], np.array([1, 8])).tolist() == [NOT_FINISHED, STOPPED]
    table.free(int(rows[2]))
    assert table.add(SP(), 4, 3, True) == rows[2]
