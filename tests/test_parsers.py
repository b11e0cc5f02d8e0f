"""The agents' answer parsers: well-formed, sloppy, truncated and garbage answers."""

import time

import pytest

from mcl_runtime.agents.parsers import (
    extract_tag,
    parse_code,
    parse_debugging,
    parse_plan,
    parse_retrieval,
    parse_verification,
)

GOOD_RETRIEVAL = """Sure! Here are the problems.
```xml
<root>
<problem>
<description>Sum two numbers.</description>
<code>
```python
def add(a, b):
    return a + b
```
</code>
<planning>1. Return a + b.</planning>
</problem>
<problem>
<description><![CDATA[Count items < 5 & > 1.]]></description>
<code>def f(xs): return sum(1 < x < 5 for x in xs)</code>
<planning>Loop and count.</planning>
</problem>
<algorithm>Simple arithmetic; no special technique.</algorithm>
</root>
```
Hope this helps."""


def test_retrieval_well_formed_with_stray_text_fences_and_cdata():
    r = parse_retrieval(GOOD_RETRIEVAL, k=3)
    assert r.ok and r.error == ""
    assert [e.description for e in r.exemplars] == ["Sum two numbers.", "Count items < 5 & > 1."]
    assert r.exemplars[0].code == "def add(a, b):\n    return a + b"
    assert r.exemplars[1].code == "def f(xs): return sum(1 < x < 5 for x in xs)"
    assert r.exemplars[1].planning == "Loop and count."
    assert r.algorithm == "Simple arithmetic; no special technique."


def test_retrieval_keeps_at_most_k():
    assert len(parse_retrieval(GOOD_RETRIEVAL, k=1).exemplars) == 1


def test_retrieval_missing_closing_tags_and_root():
    text = (
        "<problem><description>Reverse a list<code>xs[::-1]<planning>slice it</problem>"
        "<problem><description>Second one<planning>do it<algorithm>slicing"
    )
    r = parse_retrieval(text)
    assert r.ok
    assert [(e.description, e.code, e.planning) for e in r.exemplars] == [
        ("Reverse a list", "xs[::-1]", "slice it"),
        ("Second one", "", "do it"),
    ]
    assert r.algorithm == "slicing"


def test_retrieval_xml_entities_are_unescaped():
    r = parse_retrieval(
        "<root><problem><description>a &lt; b</description><planning>p</planning>"
        "</problem><algorithm>x &amp; y</algorithm></root>"
    )
    assert r.exemplars[0].description == "a < b" and r.algorithm == "x & y"


@pytest.mark.parametrize(
    "text,why",
    [
        ("", "recalled problems and algorithm"),
        ("I cannot help with that.", "recalled problems and algorithm"),
        ("<root><algorithm>greedy</algorithm></root>", "recalled problems"),
        ("<root><problem><description>d</description><planning>p</planning></problem>", "algorithm"),
        ("<problem><code>only code</code></problem><algorithm>x</algorithm>", "recalled problems"),
        ("\x00\x01 <<<>>> </problem> <problem", "recalled problems and algorithm"),
    ],
)
def test_retrieval_format_failures(text, why):
    r = parse_retrieval(text)
    assert not r.ok and why in r.error


def test_plan():
    assert parse_plan("Planning:\n1. read\n2. print\n").plan == "1. read\n2. print"
    assert parse_plan("  step one ").ok
    empty = parse_plan("  \n ")
    assert not empty.ok and empty.plan == ""


@pytest.mark.parametrize(
    "text,confidence",
    [
        ("<root><explanation>fine</explanation><confidence>85</confidence></root>", 85),
        ("```xml\n<root>\n<explanation>ok</explanation>\n<confidence> 70 </confidence>\n</root>\n```", 70),
        ("<confidence>150</confidence>", 100),
        ("<confidence>-4</confidence>", 0),
        ("<confidence>about 62.5 percent", 62),
        ("The plan works. Confidence: 90", 90),
        ("<explanation>unclosed explanation <confidence>40", 40),
    ],
)
def test_verification(text, confidence):
    v = parse_verification(text)
    assert v.ok and v.confidence == confidence


def test_verification_explanation_and_failures():
    assert parse_verification("<explanation>because</explanation><confidence>1</confidence>").explanation == "because"
    for text in ("", "looks good to me", "<confidence>high</confidence>", "<root><explanation>x</explanation>"):
        v = parse_verification(text)
        assert not v.ok and v.confidence == 0 and v.error == "no confidence number"


def test_code_last_fenced_python_block():
    text = (
        "Idea:\n```python\ndef f():\n    return 1\n```\nthen better:\n```python\ndef f():\n    return 2\n```\n"
        "Output:\n```text\n2\n```\n"
    )
    c = parse_code(text)
    assert c.ok and c.code == "def f():\n    return 2"
    assert "then better:" in c.notes


def test_code_untagged_and_other_language_fences():
    assert parse_code("```\nprint(1)\n```").code == "print(1)"
    assert parse_code("```Python3\nprint(3)\n```").code == "print(3)"
    assert parse_code("```cpp\nint main(){}\n```").code == "int main(){}"


def test_code_unclosed_fence_from_a_truncated_answer():
    c = parse_code("Here it is:\n```python\ndef f(x):\n    return x +")
    assert c.ok and c.code == "def f(x):\n    return x +" and c.notes == "Here it is:"


def test_code_bare_python_is_accepted_prose_is_not():
    assert parse_code("def f():\n    return 1\n").ok
    prose = parse_code("I think you should loop over the list and add things up.")
    assert not prose.ok and prose.error == "no code block and the answer is not Python"
    assert not parse_code("").ok
    assert not parse_code("```python\n\n```").ok
    assert not parse_code("```").ok


def test_debugging_gives_revised_plan_and_code():
    d = parse_debugging("Revised plan: use >= instead of >.\n```python\nprint(1)\n```")
    assert d.ok and d.code == "print(1)" and d.notes == "Revised plan: use >= instead of >."


def test_extract_tag_is_case_insensitive_and_none_when_absent():
    assert extract_tag("<Confidence>5</Confidence>", "confidence") == "5"
    assert extract_tag("no tags here", "confidence") is None


@pytest.mark.parametrize(
    "garbage", ["", "\x00" * 50, "<" * 1000, "```" * 99, "é漢字🙂" * 100, "<root>" + "<problem>" * 500, "x" * 200_000]
)
def test_no_parser_crashes_on_garbage(garbage):
    for parse in (parse_retrieval, parse_plan, parse_verification, parse_code, parse_debugging):
        assert isinstance(parse(garbage).ok, bool)


@pytest.mark.parametrize(
    "hostile",
    [
        "<algorithm" * 20_000,
        "<code>" + "```" * 20_000,
        "```x" * 20_000,
        "<problem><description>" * 5_000,
        "<confidence>" * 20_000,
    ],
)
def test_parsers_stay_linear_on_pathological_answers(hostile):
    start = time.monotonic()
    for parse in (parse_retrieval, parse_verification, parse_code):
        parse(hostile)
    assert time.monotonic() - start < 2.0
