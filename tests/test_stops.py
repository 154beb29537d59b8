"""StopStringMatcher: earliest-ending match, minimal holdback, split-invariance against a brute force."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgen.stops import StopStringMatcher


def run(stops, pieces):
    """Feed pieces; return (emitted text, stopped, matched stop, per-feed emissions)."""
    m = StopStringMatcher(stops)
    emitted = []
    for piece in pieces:
        out, stopped = m.feed(piece)
        emitted.append(out)
        if stopped:
            return "".join(emitted), True, m.matched, emitted
    emitted.append(m.flush())
    return "".join(emitted), False, None, emitted


def reference(stops, text):
    """Brute force: the first end position where a stop ends; the longest such stop; text before it."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[: end - len(stop)], True, stop
    return text, False, None


def holdback(stops, text):
    """Brute force: length of the longest suffix of text that is a proper prefix of a stop string."""
    return max((k for k in range(1, len(text) + 1) for s in stops if len(s) > k and s.startswith(text[-k:])),
               default=0)


def test_match_across_token_boundaries():
    text, stopped, matched, per_feed = run(["STOP"], ["Hel", "lo S", "T", "OP and more"])
    assert (text, stopped, matched) == ("Hello ", True, "STOP")
    assert per_feed == ["Hel", "lo ", "", ""]


def test_match_spanning_many_feeds_one_char_each():
    assert run(["<|end|>"], list("answer<|end|>junk"))[:2] == ("answer", True)


@pytest.mark.parametrize("pieces", [["STOP"], ["ST", "OP"], ["S", "T", "O", "P", "x"], ["STOPSTOP"]])
def test_match_at_the_very_start(pieces):
    assert run(["STOP"], pieces)[:3] == ("", True, "STOP")


def test_same_start_shorter_stop_ends_first():
    assert run(["abc", "ab"], ["xabcd"])[:3] == ("x", True, "ab")


def test_same_end_longer_stop_is_excluded_whole():
    assert run(["bc", "abc"], ["xab", "c"])[:3] == ("x", True, "abc")


def test_stop_inside_a_longer_stop_ends_first_and_wins():
    assert run(["abcd", "bc"], ["abcd"])[:3] == ("a", True, "bc")
    assert run(["abcd", "bc"], ["ab", "cd"])[:3] == ("a", True, "bc")


def test_earliest_of_several_matches_in_one_feed():
    assert run(["zz", "b"], ["a zz b"])[:3] == ("a ", True, "zz")


def test_holdback_released_as_soon_as_impossible():
    m = StopStringMatcher(["abc"])
    assert m.feed("xa") == ("x", False)
    assert m.feed("b") == ("", False)
    assert m.feed("d") == ("abd", False)
    assert m.flush() == ""


def test_holdback_shrinks_to_the_longest_possible_start():
    m = StopStringMatcher(["aab"])
    assert m.feed("aa") == ("", False)
    assert m.feed("a") == ("a", False)  # "aa" could still begin "aab"; the first "a" cannot
    assert m.feed("b") == ("", True)  # output "aaab": the first "a" was already emitted


def test_flush_releases_the_held_tail():
    m = StopStringMatcher(["\n\nUser:"])
    assert m.feed("Bye\n\nUs") == ("Bye", False)
    assert m.flush() == "\n\nUs"


def test_after_a_match_the_matcher_is_finished():
    m = StopStringMatcher(["x"])
    assert m.feed("axb") == ("a", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_unicode_stops_and_text():
    assert run(["終わり", "👋🏽"], ["こんにちは終", "わりです"])[:3] == ("こんにちは", True, "終わり")
    assert run(["終わり", "👋🏽"], ["é👋", "🏽!"])[:3] == ("é", True, "👋🏽")
    m = StopStringMatcher(["👋🏽"])
    assert m.feed("hi👋") == ("hi", False)
    assert m.feed("!") == ("👋!", False)


def test_no_stops_is_passthrough():
    m = StopStringMatcher([])
    assert [m.feed(p) for p in ["a", "", "bc"]] == [("a", False), ("", False), ("bc", False)]
    assert m.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def test_feed_work_does_not_grow_with_the_output():
    m = StopStringMatcher(["never"])
    for _ in range(20_000):
        assert m.feed("token ") == ("token ", False)
    assert len(m._held) == 0


def _split(text, cuts):
    """Cut text at the given (sorted, deduplicated) positions."""
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


alphabet = st.sampled_from("ab\né")
stop_lists = st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=4)


@settings(max_examples=400, deadline=None)
@given(stops=stop_lists, text=st.text(alphabet, max_size=30), cuts=st.lists(st.integers(0, 31), max_size=10))
def test_matches_brute_force_for_any_split(stops, text, cuts):
    pieces = _split(text, cuts)
    out, stopped, matched, _ = run(stops, pieces)
    assert (out, stopped, matched) == reference(stops, text)


@settings(max_examples=300, deadline=None)
@given(stops=stop_lists, text=st.text(alphabet, max_size=30), cuts=st.lists(st.integers(0, 31), max_size=10))
def test_holds_back_exactly_what_could_begin_a_stop(stops, text, cuts):
    m, seen, emitted = StopStringMatcher(stops), "", ""
    for piece in _split(text, cuts):
        out, stopped = m.feed(piece)
        seen, emitted = seen + piece, emitted + out
        if stopped:
            return
        assert emitted == seen[: len(seen) - holdback(stops, seen)]
