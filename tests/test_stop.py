"""StopStringMatcher: hold-back, matches split over feeds, overlap, chunking independence."""
import random

import pytest

from localsgl.engine.stop import StopStringMatcher


def run(stops, pieces):
    m = StopStringMatcher(stops)
    out = []
    matched = None
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit is not None:
            assert matched is None
            matched = hit
    out.append(m.flush())
    return "".join(out), matched


def reference(stops, text):
    """Whole-text semantics: the stop that completes first wins; ties -> the longest."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0:
            key = (i + len(s), i)
            if best is None or key < best[0]:
                best = (key, s, i)
    if best is None:
        return text, None
    return text[: best[2]], best[1]


def test_no_stops_passthrough():
    m = StopStringMatcher([])
    assert m.feed("hello") == ("hello", None)
    assert m.flush() == ""


def test_simple_match_in_one_feed():
    m = StopStringMatcher(["END"])
    assert m.feed("abc END def") == ("abc ", "END")
    assert m.feed("more") == ("", None)  # ignored after the match
    assert m.flush() == ""
    assert m.matched == "END" and m.stopped


def test_split_across_many_feeds():
    m = StopStringMatcher(["<|stop|>"])
    emitted = []
    for ch in "hi <|sto":
        t, hit = m.feed(ch)
        emitted.append(t)
        assert hit is None
    assert "".join(emitted) == "hi "  # "<|sto" held back
    assert m.feed("p") == ("", None)
    assert m.feed("|>tail") == ("", "<|stop|>")
    assert m.flush() == ""


def test_false_start_released():
    m = StopStringMatcher(["abc"])
    assert m.feed("xxab") == ("xx", None)
    assert m.feed("d") == ("abd", None)
    assert m.feed("a") == ("", None)
    assert m.flush() == "a"  # generation ended otherwise: held text comes out
    assert m.flush() == ""


def test_stop_at_very_start():
    m = StopStringMatcher(["\n\n"])
    assert m.feed("\n") == ("", None)
    assert m.feed("\nrest") == ("", "\n\n")


def test_overlapping_stops_first_to_complete_wins():
    # "bc" completes before "abcd" does, whatever the chunking.
    for pieces in (["abcd"], list("abcd"), ["ab", "cd"]):
        assert run(["abcd", "bc"], pieces) == ("a", "bc")
    # Same end position: the longer (earlier-starting) one wins.
    assert run(["cd", "bcd"], ["abcde"]) == ("a", "bcd")
    # Self-overlapping stop: "aab" inside "aaab".
    assert run(["aab"], list("xaaab")) == ("xa", "aab")


def test_no_false_hold_back_after_flush():
    m = StopStringMatcher(["STOP"])
    assert m.feed("the end S") == ("the end ", None)
    assert m.flush() == "S"
    m2 = StopStringMatcher(["STOP"])
    assert m2.feed("nothing here") == ("nothing here", None)
    assert m2.flush() == ""


def test_unicode_stops():
    assert run(["世界"], ["你好", "世", "界!"]) == ("你好", "世界")
    assert run(["🎉"], ["ok ", "🎉"]) == ("ok ", "🎉")


@pytest.mark.parametrize("seed", range(300))
def test_random_chunkings_match_reference(seed):
    rng = random.Random(seed)
    alphabet = "ab c\n"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    assert run(stops, pieces) == reference(stops, text)
