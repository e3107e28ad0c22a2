"""`SettingError`: a refused setting, worded in the caller's names for the settings it is about.

A config's field is `topk` to a library caller and `--topk` on the command line. The message names
each setting it is about as a `{field}` placeholder, so each caller spells it its own way: `str()`
gives the field names, `worded(spelling)` the names a caller passes (the CLI: each option's flag).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping


class SettingError(ValueError):
    """ValueError about named settings.

    Each `{name}` of `template` that is not a key of `values` is a setting; the values fill the
    other fields (format conversions work: `{got!r}`), once, so braces inside them stay as they are.

        SettingError("{topk} must be >= 1, got {got}", got=0)   # "topk must be >= 1, got 0"
    """

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        fields = (field for _, field, _, _ in string.Formatter().parse(template) if field)
        self.settings = tuple(dict.fromkeys(field for field in fields if field not in values))
        super().__init__(self.worded({}))

    def worded(self, spelling: Mapping[str, str]) -> str:
        """The message with each setting spelled as `spelling` names it (else as its field name)."""
        names = {name: spelling.get(name, name) for name in self.settings}
        return self.template.format(**names, **self.values)

    def __reduce__(self):
        # Rebuilt from its parts, not from the worded message (a DataLoader worker re-raises it).
        return functools.partial(SettingError, **self.values), (self.template,)
