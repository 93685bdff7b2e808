"""Reading the project's YAML declarations (contracts, code lists, outputs, agreements) fast.

One nightly run reads the same few declaration files hundreds of times (every asset factory,
every stage and the catalog load the contracts, outputs and agreements again). Two things
keep that cheap (issue 22):

* PyYAML's C loader (``CSafeLoader``, libyaml) when it is built in, else the pure-Python
  ``SafeLoader``: both are safe loaders (no arbitrary objects) and give the same data.
* Each text is parsed once a process: the cache is keyed by the text itself, so a file that
  changed is parsed again, and callers get a deep copy, so none can change what another reads.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

import yaml

#: the C loader when PyYAML was built with libyaml, else the pure-Python one (both safe)
SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@lru_cache(maxsize=512)
def _parsed(text: str) -> Any:
    return yaml.load(text, Loader=SafeLoader)  # a safe loader: plain data only


def safe_load(text: str) -> Any:
    """``yaml.safe_load(text)``, parsed once per distinct text; a fresh copy for each caller."""
    return copy.deepcopy(_parsed(text))
