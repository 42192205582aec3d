import pytest

from diffprobe.store.errors import ConfigError
from diffprobe.store.ranges import format_int_list, parse_int_list


@pytest.mark.parametrize(
    "text,want",
    [
        ("19,24,30", (19, 24, 30)),
        ("1-5", (1, 2, 3, 4, 5)),
        ("1-3,24,2", (1, 2, 3, 24)),
        (" 7 ", (7,)),
        (5, (5,)),
        ([90, "150-151"], (90, 150, 151)),
    ],
)
def test_parse(text, want):
    assert parse_int_list(text, "k") == want


@pytest.mark.parametrize("text", ["", "1,,2", "a", "5-3", "1-x", True, 2.5, []])
def test_parse_errors_name_the_key(text):
    with pytest.raises(ConfigError, match=r"^extract\.blocks: "):
        parse_int_list(text, "extract.blocks")


def test_format_round_trip():
    assert format_int_list([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"
    assert parse_int_list(format_int_list([1, 2, 3, 5, 7, 8]), "k") == (1, 2, 3, 5, 7, 8)
