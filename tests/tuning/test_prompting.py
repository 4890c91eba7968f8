"""The answer parser: completions that break the template are malformed abstentions, never answers."""

import pytest

from tuning.grading import classify
from tuning.prompting import ABSTAIN, abstain_answer, cot_answer, parse_answer, repeats_template

# The completion `make demo` printed, cut by its token budget inside the repeated quote marker.
DEMO = "##Answer: ##begin_quote## ##end_quote## ##Answer: ##begin"


@pytest.mark.parametrize("text", [
    DEMO,
    "##Answer: 1889 ##Answer: 1889",                      # a second answer section
    "##Answer: Tarrow ##Reason: the office",               # the reason again after the answer
    "##Answer: Tarrow ##end_quote##",
    "##Answer: Tarrow ##",                                 # cut at the start of the next marker
    "##Answer:",                                           # an empty answer
    "##Answer: <|im_end|>",
    "",                                                    # an empty completion
    "##Reason: the office ##Reason: the office",
    "##begin_quote## ##end_quote##",                       # an empty quote and nothing else
])
def test_a_completion_breaking_the_template_is_a_malformed_abstention(text):
    parsed = parse_answer(text)
    assert (parsed.malformed, parsed.abstained, parsed.answer, parsed.quotes) == (True, True, "", [])


def test_the_demo_completion_is_no_longer_graded_as_the_answer_begin():
    parsed = parse_answer(DEMO)
    assert classify(parsed.answer, parsed.abstained, ["begin"]) == "abstained"


@pytest.mark.parametrize("text,answer,abstained", [
    (cot_answer("The office is in Tarrow.", "Tarrow"), "Tarrow", False),
    (abstain_answer(), ABSTAIN, True),
    ("##Answer: 14 months<|im_end|>", "14 months", False),
    ("Paris is the capital.", "Paris is the capital.", False),
    ("##begin_quote## Paris is the capital. ##end_quote##", "Paris is the capital.", False),
    ("## Answer\nParis", "## Answer Paris", False),        # a markdown heading is no template marker
    ("Room #4, C## notes", "Room #4, C## notes", False),
    # cut by the budget inside its quote, before any answer: graded on what it wrote, as before
    ("##Reason: The documents say ##begin_quote## The office is in", "The documents say ##begin_quote## The office is in",
     False),
])
def test_well_formed_completions_parse_as_before(text, answer, abstained):
    parsed = parse_answer(text)
    assert (parsed.answer, parsed.abstained, parsed.malformed) == (answer, abstained, False)


def test_repeats_template_only_after_the_answer_has_begun():
    assert repeats_template("##Answer: Tarrow ##Answer:")
    assert repeats_template("##Answer: ##begin_quote##")
    assert not repeats_template("##Reason: ##begin_quote## The office is in Tarrow. ##end_quote## ##Answer: Tarrow")
    assert not repeats_template("##Answer: Tarrow ##")  # not yet a marker: generation goes on
