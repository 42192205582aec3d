"""The list syntax shared by every CLI flag and config key that takes several integers.

``"19,24,30"``, ``"1-37"``, ``"1-5,24,30-32"``: comma-separated integers and inclusive
ranges. The result keeps first-seen order and drops repeats.
"""

from __future__ import annotations

from .errors import ConfigError

MAX_RANGE = 100_000


def parse_int_list(text: str | int | list, key: str) -> tuple[int, ...]:
    """Parse ``text`` (a spec string, an int or a list of ints) into a tuple of ints.

    ``key`` names the flag or config key in the error message.
    """
    if isinstance(text, bool):
        raise ConfigError(f"{key}: expected integers like '19,24,30' or '1-37', got {text!r}")
    if isinstance(text, int):
        return (text,)
    if isinstance(text, (list, tuple)):
        out: dict[int, None] = {}
        for item in text:
            out.update(dict.fromkeys(parse_int_list(item, key)))
        if not out:
            raise ConfigError(f"{key}: the list is empty; give at least one value")
        return tuple(out)
    if not isinstance(text, str):
        raise ConfigError(f"{key}: expected integers like '19,24,30' or '1-37', got {text!r}")
    out = {}  # ordered set (the same dict[int, None] as above)
    for part in text.replace(" ", "").split(","):
        if not part:
            raise ConfigError(f"{key}: empty item in {text!r}; use e.g. '19,24,30' or '1-37'")
        lo, sep, hi = part.partition("-")
        try:
            values = range(int(lo), int(hi) + 1) if sep else [int(part)]
        except ValueError:
            raise ConfigError(
                f"{key}: cannot read {part!r} in {text!r}; use integers and ranges like '1-5,24'"
            ) from None
        if sep and int(hi) < int(lo):
            raise ConfigError(f"{key}: range {part!r} runs backwards; write it low-high")
        if len(values) > MAX_RANGE:
            raise ConfigError(f"{key}: range {part!r} has {len(values)} values; at most {MAX_RANGE}")
        out.update(dict.fromkeys(values))
    return tuple(out)


def format_int_list(values) -> str:
    """The inverse of `parse_int_list` for display: ``(1,2,3,5)`` -> ``'1-3,5'``."""
    values = sorted(set(values))
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)
