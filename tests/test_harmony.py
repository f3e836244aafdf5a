"""gpt-oss's harmony format through openai-harmony: prompts rendered by the library, turns parsed
message by message (analysis = reasoning, final = answer, tool calls and preambles kept apart),
and the checkpoint's template checked against the library by ``curate doctor``.

The harmony format is described in OpenAI's harmony guide (cookbook.openai.com/articles/openai-harmony)
and openai/gpt-oss-20b's chat template; the tiny gpt-oss model's template (tests/families/templates/
harmony.jinja) is written from them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from probes import harmony
from probes.chat import build_completion, render_generation_prompt, split_completion
from probes.families import HARMONY, family_of
from probes.models import load_model

ENDS = ("<|return|>", "<|call|>", "<|endoftext|>")

try:
    harmony.encoding()
    _SKIP = None
except harmony.HarmonyUnavailable as exc:  # printed by pytest -rs; make install puts the vocabulary in place
    _SKIP = str(exc)
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"openai-harmony cannot load: {_SKIP}")


def test_the_prompt_is_the_librarys_and_opens_the_analysis_channel() -> None:
    text = render_generation_prompt(None, "a question?", HARMONY)  # no tokenizer: the library renders it
    assert text.endswith("<|start|>user<|message|>a question?<|end|><|start|>assistant<|channel|>analysis<|message|>")
    assert "Reasoning: medium" in text and "Current date" not in text  # the same text every day
    high = replace(HARMONY, template_kwargs={"reasoning_effort": "high"}, system_prompt="Answer safely.")
    text = render_generation_prompt(None, "a question?", high)
    assert "Reasoning: high" in text and "<|start|>developer<|message|># Instructions\n\nAnswer safely.<|end|>" in text
    with pytest.raises(ValueError, match="enable_thinking"):
        render_generation_prompt(None, "q", replace(HARMONY, template_kwargs={"enable_thinking": True}))
    with pytest.raises(ValueError, match="reasoning_effort must be one of"):
        render_generation_prompt(None, "q", replace(HARMONY, template_kwargs={"reasoning_effort": "max"}))


def test_a_turn_round_trips_and_end_tokens_and_padding_are_gone() -> None:
    turn = build_completion("weigh the request", "a safe answer", HARMONY)
    assert turn == "weigh the request<|end|><|start|>assistant<|channel|>final<|message|>a safe answer"
    for tail in ("<|return|>", "<|return|><|endoftext|><|endoftext|>", ""):
        split = split_completion(turn + tail, HARMONY, ENDS)
        assert (split.reasoning, split.answer, split.closed, split.other) == ("weigh the request", "a safe answer", True, ())


def test_tool_calls_and_preambles_are_kept_apart_from_reasoning_and_answer() -> None:
    text = ("look it up<|end|><|start|>assistant<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>"
            '{"q": "x"}<|call|>')
    split = split_completion(text, HARMONY, ENDS)
    assert (split.reasoning, split.answer, split.closed) == ("look it up", "", True)
    assert [(m.channel, m.recipient, m.text) for m in split.other] == [("commentary", "functions.lookup", '{"q": "x"}')]
    # Reasoning, a preamble to the user, more reasoning, then the answer: the first analysis message
    # is the reasoning (the span the probe scores), the last final message the answer.
    text = ("first<|end|><|start|>assistant<|channel|>commentary<|message|>one moment<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>second<|end|>"
            "<|start|>assistant<|channel|>final<|message|>done<|return|>")
    split = split_completion(text, HARMONY, ENDS)
    assert (split.reasoning, split.answer) == ("first", "done")
    assert [(m.channel, m.text) for m in split.other] == [("commentary", "one moment"), ("analysis", "second")]


def test_unclosed_cut_and_malformed_turns() -> None:
    assert split_completion("still weighing", HARMONY, ENDS) == split_completion("still weighing<|endoftext|>", HARMONY, ENDS)
    capped = split_completion("still weighing", HARMONY, ENDS)
    assert (capped.reasoning, capped.answer, capped.closed) == ("still weighing", "", False)
    # An answer cut by the length cap is still the answer.
    cut = split_completion("done<|end|><|start|>assistant<|channel|>final<|message|>the answer so f", HARMONY, ENDS)
    assert (cut.reasoning, cut.answer, cut.closed) == ("done", "the answer so f", True)
    # A header the parser rejects: what came before it stands.
    bad = split_completion("done<|end|><|message|>junk", HARMONY, ENDS)
    assert (bad.reasoning, bad.closed) == ("done", True)


def test_a_pool_response_in_harmony_is_read_by_the_library() -> None:
    from curation.pipeline.sources import split_response

    written = ("<|start|>assistant<|channel|>analysis<|message|>weigh it<|end|>"
               "<|start|>assistant<|channel|>final<|message|>no<|return|>")
    assert split_response(written, HARMONY, ENDS) == ("weigh it", "no")
    assert split_response("<|channel|>final<|message|>only an answer<|return|>", HARMONY, ENDS) == ("", "only an answer")
    assert split_response("a plain answer<|return|>", HARMONY, ENDS) == ("", "a plain answer")


def test_a_vocabulary_that_does_not_match_the_digest_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / harmony.VOCAB_FILE).write_bytes(b"not the vocabulary")
    monkeypatch.setenv(harmony.VOCAB_ENV, str(tmp_path))
    found = harmony.vocab_folder()
    assert found != tmp_path


def test_doctor_compares_the_library_with_the_checkpoints_template(tiny_dirs: dict[str, Path]) -> None:
    from probes.doctor_harmony import check_harmony_prompt

    lm = load_model(tiny_dirs["gpt_oss"])
    fmt = family_of(lm.model).thinking
    template = lm.tokenizer.chat_template
    assert fmt.harmony and check_harmony_prompt(lm.tokenizer, fmt).passed  # the template adds today's date; allowed
    # The system message's meta lines may differ (identity, cutoff, date), not the reasoning effort ...
    lm.tokenizer.chat_template = template.replace("Knowledge cutoff: 2024-06", "Knowledge cutoff: 2099-01")
    assert check_harmony_prompt(lm.tokenizer, fmt).passed
    lm.tokenizer.chat_template = template.replace("Reasoning: {{", "Reasoning level: {{")
    result = check_harmony_prompt(lm.tokenizer, fmt)
    assert not result.passed and "Reasoning: medium" in result.detail
    # ... and the turns after it must be the same text: a template that writes the user's turn
    # another way is caught, and where.
    lm.tokenizer.chat_template = template.replace("<|start|>user<|message|>", "<|start|>user <|message|>")
    result = check_harmony_prompt(lm.tokenizer, fmt)
    assert not result.passed and "differ at character" in result.detail and "template ' <|message|>" in result.detail


@pytest.mark.parametrize("out_format", ["jsonl", "parquet"])
def test_exports_keep_the_other_messages_beside_the_pair(tmp_path: Path, out_format: str) -> None:
    import json

    import polars as pl

    from curation.pipeline.slice_out import write_slice

    base = {"id": "a", "prompt": "p", "reasoning": "r", "answer": "x", "category": None, "source": "s",
            "misalignment": 0.5, "rank": 0}
    call = {"channel": "commentary", "recipient": "functions.lookup", "content_type": "<|constrain|>json", "text": "{}"}
    records = [{**base, "other_messages": [call]}, {**base, "id": "b", "rank": 1}]
    out = tmp_path / f"slice.{out_format}"
    write_slice(records, out, out_format)
    if out_format == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert rows[0]["other_messages"] == [call] and "other_messages" not in rows[1]
    else:
        frame = pl.read_parquet(out)
        assert [json.loads(v) for v in frame["other_messages"]] == [[call], []]
