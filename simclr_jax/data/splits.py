"""Split names with tfds-style slicing ('train[:1000]', 'train[10%:]') for the local sources.

tfds slices its own splits; the local readers load a whole split and keep the slice this names, so
the same `--config.dataset.train_split='train[:5000]'` works whichever source serves the data.
"""

from __future__ import annotations

import re

_SPLIT_RE = re.compile(r"^(?P<name>[A-Za-z0-9_\-]+)(\[(?P<start>[^:\]]*):(?P<stop>[^:\]]*)\])?$")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    """'train[10:50%]' -> ('train', '10', '50%'); plain names give (name, None, None)."""
    match = _SPLIT_RE.match(split.strip())
    if match is None:
        raise ValueError(
            f"split {split!r} is not 'NAME' or 'NAME[start:stop]' (integers or percentages, "
            "e.g. 'train[:1000]', 'train[10%:]')"
        )
    return match["name"], match["start"], match["stop"]


def _bound(text: str | None, size: int, split: str) -> int | None:
    if text is None or text.strip() == "":
        return None
    text = text.strip()
    try:
        if text.endswith("%"):
            return round(float(text[:-1]) * size / 100)
        return int(text)
    except ValueError:
        raise ValueError(
            f"split {split!r}: slice bound {text!r} is not an integer or a percentage"
        ) from None


def slice_for(split: str, size: int) -> slice:
    """The slice of a `size`-example split that `split` names (the whole split if unsliced)."""
    _, start, stop = parse_split(split)
    return slice(_bound(start, size, split), _bound(stop, size, split))
