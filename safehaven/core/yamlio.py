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
_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_MERGE = "tag:yaml.org,2002:merge"


class SafeLoader(_Base):  # type: ignore[valid-type,misc]
    """The safe loader, refusing a mapping that names a key twice: YAML's own rule, which PyYAML does
    not enforce (the last one silently won, so an agreement could say two things and mean the second,
    past a reviewer reading from the top: found by review)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:  # merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


@lru_cache(maxsize=512)
def _parsed(text: str) -> Any:
    return yaml.load(text, Loader=SafeLoader)  # a safe loader: plain data only


def safe_load(text: str) -> Any:
    """``yaml.safe_load(text)``, parsed once per distinct text; a fresh copy for each caller."""
    return copy.deepcopy(_parsed(text))
