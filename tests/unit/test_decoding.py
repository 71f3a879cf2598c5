"""TextStream: token pieces -> the text a user sees, as it streams."""

from __future__ import annotations

import pytest

from convllava_edge.decoding import TextStream


def shown(pieces: list[bytes], stops=("</s>",)) -> tuple[list[str], TextStream]:
    """What each push returned, then what finish returned, as one list. Like the Decoder, nothing more is
    pushed once the stream has stopped."""
    stream = TextStream(stops)
    out = []
    for piece in pieces:
        out.append(stream.push(piece))
        if stream.stopped:
            break
    return out + [stream.finish()], stream


def test_the_leading_space_is_dropped_and_later_spaces_kept():
    out, _ = shown([b" The", b" red", b" one"])
    assert out == ["The", " red", " one", ""]


def test_whitespace_alone_waits_for_the_first_visible_character():
    out, _ = shown([b" ", b"\n", b"3", b" "])
    assert out == ["", "", "3", " ", ""]


def test_a_stop_string_split_across_pieces_is_held_back_and_never_shown():
    out, stream = shown([b" yes<", b"/", b"s>", b"never pushed"])
    assert out == ["yes", "", "", ""]
    assert stream.stopped and stream.text == " yes"


def test_a_held_back_prefix_that_does_not_become_the_stop_is_released():
    out, stream = shown([b" a<", b"/", b"b", b"c"])
    assert out == ["a", "", "</b", "c", ""] and not stream.stopped


def test_the_text_before_a_stop_in_the_same_piece_is_shown():
    out, stream = shown([b" 3</s>USER:"])
    assert out == ["3", ""] and stream.stopped


def test_the_earliest_of_several_stop_strings_wins():
    out, stream = shown([b" left USER: x</s>"], stops=("</s>", "USER:"))
    assert "".join(out) == "left " and stream.text == " left "


def test_empty_stop_strings_are_ignored():
    out, stream = shown([b" ok"], stops=("",))
    assert out == ["ok", ""] and not stream.stopped


def test_incomplete_utf8_is_held_until_its_last_byte():
    e_acute = "é".encode()  # 2 bytes
    out, _ = shown([b" caf", e_acute[:1], e_acute[1:], b"!"])
    assert out == ["caf", "", "é", "!", ""]


def test_a_character_cut_off_at_the_end_becomes_one_replacement_character():
    out, _ = shown([b" ok", "€".encode()[:2]])
    assert out == ["ok", "", "\ufffd"]


@pytest.mark.parametrize("cut", range(1, len(" Grüße, 3 Würfel</s>rest".encode())))
def test_any_split_into_two_pieces_shows_the_same_text(cut):
    data = " Grüße, 3 Würfel</s>rest".encode()
    out, stream = shown([data[:cut], data[cut:]])
    assert "".join(out) == "Grüße, 3 Würfel" and stream.stopped
