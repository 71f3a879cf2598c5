"""Prompt building: templates rendered as the official code renders them, and the splice plan."""

from __future__ import annotations

import pytest

from convllava_edge.errors import ConfigError
from convllava_edge.prompt import (MAX_TEXT_CHARS, VICUNA_V1, ChatTemplate, ImageSlot, Template, common_prefix,
                                   describe_positions, image_end, positions, splice, template_from_dict,
                                   user_turns)

SYSTEM = VICUNA_V1.system
BOS = 1
SLOT = ImageSlot("a" * 64, 16)

# A tiny chat template in the style of Llama-3.1's: one header per message, an end-of-turn after each.
TINY_JINJA = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TINY_CHAT = ChatTemplate(name="tiny", chat_template=TINY_JINJA, system="Be brief.", bos_token="<s>",
                         answer_header="<|assistant|>", stop=("<|eot|>",))


def test_vicuna_v1_one_question_puts_the_image_first():
    assert VICUNA_V1.render([("What is it?", None)]) == f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"


def test_vicuna_v1_multi_turn_closes_each_answer_with_sep2():
    text = VICUNA_V1.render([("How many?", "3"), ("  Which colour?  ", "red"), ("Where?", None)])
    assert text == (f"{SYSTEM} USER: <image>\nHow many? ASSISTANT: 3</s>"
                    "USER: Which colour? ASSISTANT: red</s>USER: Where? ASSISTANT:")


def test_vicuna_v1_without_an_image_has_no_placeholder():
    assert VICUNA_V1.render([("Hi", None)], image=False) == f"{SYSTEM} USER: Hi ASSISTANT:"


def test_a_template_round_trips_through_its_dict():
    custom = Template(name="t", system="S", roles=("Q", "A"), sep="\n", sep2="<end>", stop=("<end>",))
    for template in (VICUNA_V1, custom):
        again = template_from_dict(template.to_dict())
        assert again == template and again.render([("x", "y"), ("z", None)]) == template.render([("x", "y"), ("z", None)])
    assert custom.render([("x", "y"), ("z", None)]) == "S\nQ: <image>\nx\nA: y<end>Q: z\nA:"


@pytest.mark.parametrize("turns,message", [
    ([], "at least one question"),
    ([("   ", None)], "the question is empty"),
    ([("look at <image> here", None)], "may not contain '<image>'"),
    ([("first", None), ("second", None)], "only the last turn may be unanswered"),
    ([(42, None)], "the question must be text, got int"),
    ([("ok", 7), ("next", None)], "an earlier answer must be text"),
    ([("bad \udcff byte", None)], "the question is not valid UTF-8"),
    ([("x" * (MAX_TEXT_CHARS + 1), None)], "characters long"),
])
def test_user_turns_refuse_bad_conversations_with_a_config_error(turns, message):
    with pytest.raises(ConfigError, match=message):
        user_turns(turns)


def test_user_turns_place_the_image_in_the_first_question_only():
    assert user_turns([(" a ", "b"), ("c", None)]) == [("<image>\na", "b"), ("c", None)]
    assert user_turns([("a", None)], image=False) == [("a", None)]


def test_chat_template_renders_messages_and_drops_the_empty_assistant_turn():
    text = TINY_CHAT.render([("How many?", "3"), ("Colour?", None)])
    assert text == ("<s><|system|>Be brief.<|eot|><|user|><image>\nHow many?<|eot|><|assistant|>3<|eot|>"
                    "<|user|>Colour?<|eot|>")  # no generation prompt: the model writes the header itself


def test_chat_template_round_trips_and_is_told_apart_from_a_plain_template():
    data = TINY_CHAT.to_dict()
    assert data["kind"] == "jinja" and template_from_dict(data) == TINY_CHAT
    assert isinstance(template_from_dict(VICUNA_V1.to_dict()), Template)


def test_chat_template_uses_transformers_whitespace_rules():
    """trim_blocks and lstrip_blocks, as transformers compiles chat templates: block lines leave no blank lines."""
    lines = ChatTemplate(name="t", chat_template="{% for m in messages %}\n  {% if m['role'] == 'user' %}\n"
                                                 "{{ m['content'] }}\n  {% endif %}\n{% endfor %}",
                         system="s", bos_token="")
    assert lines.render([("q1", "a1"), ("q2", None)], image=False) == "q1\nq2\n"


@pytest.mark.parametrize("source,message", [
    ("{% for m in messages %}", "does not compile"),
    ("{{ raise_exception('no system role') }}", "failed to render: TemplateError: no system role"),
    ("{{ 'x' * 10**8 }}", "failed to render: SecurityError: a sequence of 100,000,000 items is too long"),
])
def test_chat_template_errors_are_config_errors(source, message):
    with pytest.raises(ConfigError, match=message):
        ChatTemplate(name="bad", chat_template=source, system="s", bos_token="").render([("q", None)])


def test_splice_keeps_the_first_bos_and_drops_the_second():
    assert splice([[BOS, 5, 6], [BOS, 7, 8]], SLOT, BOS) == [BOS, 5, 6, SLOT, 7, 8]
    assert splice([[BOS, 5], [7]], SLOT, BOS) == [BOS, 5, SLOT, 7]  # a chunk without BOS is kept whole
    assert splice([[BOS], []], SLOT, BOS) == [BOS, SLOT]


def test_splice_puts_image_i_at_the_i_th_placeholder_and_drops_every_later_bos():
    other = ImageSlot("b" * 64, 4)
    # tokenizer_image_token: chunks "...", "\n", "Q" around two placeholders; prepare_inputs_labels_for_multimodal
    # puts image 0's features at the first -200 and image 1's at the second
    assert splice([[BOS, 5], [BOS, 13], [BOS, 7, 8]], [SLOT, other], BOS) == [BOS, 5, SLOT, 13, other, 7, 8]
    assert splice([[BOS, 5], [BOS], [BOS, 7]], [other, SLOT], BOS) == [BOS, 5, other, SLOT, 7]


@pytest.mark.parametrize("chunks,slots,message", [
    ([[BOS, 5]], [SLOT], "holds 0 <image> for 1 image"),
    ([[BOS], [BOS], [BOS]], [SLOT], "holds 2 <image> for 1 image"),
    ([[BOS], [BOS]], [SLOT, SLOT], "holds 1 <image> for 2 image"),
    ([[BOS], [BOS]], [], "holds 1 <image> for 0 image"),
    ([[5, 6], [BOS, 7]], [SLOT], "must start with BOS"),
    ([[], [BOS, 7]], [SLOT], "must start with BOS"),
])
def test_splice_refuses_a_placeholder_count_other_than_the_images_or_no_bos(chunks, slots, message):
    with pytest.raises(ConfigError, match=message):
        splice(chunks, slots, BOS)


def test_each_turn_gets_one_placeholder_per_image_before_its_text():
    text = VICUNA_V1.render([("Which is newer?", "the second"), ("And this one?", None)], counts=[2, 1])
    assert text == (f"{SYSTEM} USER: <image>\n<image>\nWhich is newer? ASSISTANT: the second</s>"
                    "USER: <image>\nAnd this one? ASSISTANT:")
    assert VICUNA_V1.render([("a", "b"), ("c", None)], counts=[0, 1]) == f"{SYSTEM} USER: a ASSISTANT: b</s>USER: <image>\nc ASSISTANT:"
    assert TINY_CHAT.render([("q", None)], counts=[3]).count("<image>\n") == 3


@pytest.mark.parametrize("counts", [[1], [1, 1, 0], [-1, 1], [True, 0], [1.0, 0]])
def test_image_counts_must_fit_the_turns(counts):
    with pytest.raises(ConfigError, match="do not fit a 2-turn conversation"):
        user_turns([("a", "b"), ("c", None)], counts=counts)


def test_describe_positions_gives_the_arithmetic_of_a_prompt():
    other = ImageSlot("b" * 64, 9)
    assert describe_positions([BOS, SLOT, 5, ImageSlot("c" * 64, 16), SLOT, 7]) == "3 images x 16 tokens + 3 text positions"
    assert describe_positions([BOS, SLOT, other, 7]) == "2 images (16 + 9 tokens) + 2 text positions"
    assert describe_positions([BOS, SLOT]) == "1 image of 16 tokens + 1 text position"
    assert describe_positions([BOS, 5]) == "2 text positions"


def test_positions_count_an_image_slot_as_its_tokens():
    assert positions([BOS, 5, SLOT, 7]) == 3 + SLOT.n_tokens
    assert positions([BOS, 5]) == 2 and positions([]) == 0


def test_image_end_is_the_index_just_past_the_first_image():
    items = [BOS, 5, SLOT, 7, ImageSlot("b" * 64, 1)]
    assert image_end(items) == 3 and items[:image_end(items)] == [BOS, 5, SLOT]
    assert image_end([BOS, 5, 7]) == 0


def test_common_prefix_compares_image_slots_by_content():
    other = ImageSlot("b" * 64, 16)
    assert common_prefix([BOS, 5, SLOT, 7], [BOS, 5, ImageSlot("a" * 64, 16), 7, 8]) == 4  # equal slots match
    assert common_prefix([BOS, 5, SLOT, 7], [BOS, 5, other, 7]) == 2  # another image stops it
    assert common_prefix([BOS, 5], [BOS, 6]) == 1 and common_prefix([], [BOS]) == 0
