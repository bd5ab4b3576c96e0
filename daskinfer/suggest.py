"""``did you mean ...?``: the closest known name to a misspelt one, for error messages.

Used where a name from outside is checked against a fixed set: configuration keys
(:mod:`daskinfer.config_check`) and the fields of a wire message (:mod:`daskinfer.wire.messages`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


def closest(word: str, choices: Iterable[str], aliases: Mapping[str, str] | None = None) -> str | None:
    """The known name ``word`` most likely means, or None.

    ``aliases`` maps longer spellings to known names (``{"inputs": "in"}``): a word that is
    an alias, or close to one, means the name it stands for.  Case, ``_`` and ``-`` do not
    count.
    """
    choices = list(choices)

    def norm(s: str) -> str:
        return s.lower().replace("_", "-")

    by_norm = {norm(c): c for c in choices}
    for a, target in (aliases or {}).items():
        by_norm.setdefault(norm(a), target)
    w = norm(word)
    if w in by_norm:
        return by_norm[w]
    match = difflib.get_close_matches(w, list(by_norm), n=1, cutoff=0.6)
    return by_norm[match[0]] if match else None


def did_you_mean(word: str, choices: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """``" (did you mean 'x'?)"`` for the closest known name, or ``""`` when none is close."""
    best = closest(word, choices, aliases)
    return f" (did you mean {best!r}?)" if best is not None and best != word else ""
