"""Asset keys shared by the stage modules (one place, so dependencies line up).

Every key has two parts. The first is the asset's group: the store zone or register it
writes (``landing``, ``validated``, ``haven``, ``counts``, ``vault``, ``governance``,
``published``, ``release``). The last is its label, which the Dagster UI shows on the asset
graph, so it is distinct across the whole graph: a collection's four assets are
``landing/<c>_landed``, ``validated/<c>_valid``, ``haven/<c>_haven`` and ``vault/<c>_vault``;
an output's true counts are ``counts/<output>_counts`` and its protected table
``published/<output>``, the publication of them all ``published/published_files``; a release
is ``release/<agreement>``; the objection register and its checks are ``governance/objection_*``.

Keys are built here only: other modules (the catalog, the stages, the tests) call these
functions rather than spelling a key themselves. ``check_labels`` refuses definitions in which
two assets would share a label (for example an output named ``gp_events_haven``), naming both.
"""

import dagster as dg

STORE_POOL = "safehaven_store"

#: the groups: the first part of every asset key
LANDING = "landing"
VALIDATED = "validated"
HAVEN = "haven"
COUNTS = "counts"
VAULT = "vault"
GOVERNANCE = "governance"
PUBLISHED = "published"
RELEASE = "release"


def landing(collection: str) -> dg.AssetKey:
    """A collection's batches as received (the store's ``landing.<c>``)."""
    return dg.AssetKey([LANDING, f"{collection}_landed"])


def validated(collection: str) -> dg.AssetKey:
    """A collection's rows that meet its contract (the store's ``landing.<c>_valid``)."""
    return dg.AssetKey([VALIDATED, f"{collection}_valid"])


def haven(collection: str) -> dg.AssetKey:
    """A collection's pseudonymised rows (the store's ``haven.<c>``)."""
    return dg.AssetKey([HAVEN, f"{collection}_haven"])


def vault(collection: str) -> dg.AssetKey:
    """A collection's direct identifiers, encrypted in the identity vault."""
    return dg.AssetKey([VAULT, f"{collection}_vault"])


def release(agreement_id: str) -> dg.AssetKey:
    return dg.AssetKey([RELEASE, agreement_id])


OBJECTION_REGISTER = dg.AssetKey([GOVERNANCE, "objection_register"])
OBJECTION_RATES = dg.AssetKey([GOVERNANCE, "objection_rates"])
OBJECTION_FEED = dg.AssetKey([GOVERNANCE, "objection_feed"])
PUBLISHED_FILES = dg.AssetKey([PUBLISHED, "published_files"])


def counts(output: str) -> dg.AssetKey:
    """An output's true counts per reporting month (the store's ``counts.<output>``; never published)."""
    return dg.AssetKey([COUNTS, f"{output}_counts"])


def published(output: str) -> dg.AssetKey:
    return dg.AssetKey([PUBLISHED, output])


def group(key: dg.AssetKey) -> str:
    """The asset's group: the first part of its key."""
    return key.path[0]


def label(key: dg.AssetKey) -> str:
    """What the Dagster UI labels the asset with: the last part of its key."""
    return key.path[-1]


def check_labels(asset_keys: list[dg.AssetKey]) -> None:
    """Refuse two assets with one label: the asset graph would show them as one name.

    A label comes from a collection, output or agreement name in the contracts, so the message
    names the assets and says which name to change.
    """
    seen: dict[str, dg.AssetKey] = {}
    for key in asset_keys:
        other = seen.setdefault(label(key), key)
        if other != key:
            raise dg.DagsterInvalidDefinitionError(
                f"assets {other.to_user_string()} and {key.to_user_string()} share the label {label(key)!r}, "
                "which the Dagster UI shows for both: rename the collection, output or agreement whose name "
                "makes one of them (assets/keys.py lists how each label is made)"
            )
