"""Asset keys shared by the stage modules (one place, so dependencies line up)."""

import dagster as dg

STORE_POOL = "safehaven_store"


def landing(collection: str) -> dg.AssetKey:
    return dg.AssetKey(["landing", collection])


def validated(collection: str) -> dg.AssetKey:
    return dg.AssetKey(["validated", collection])


def haven(collection: str) -> dg.AssetKey:
    return dg.AssetKey(["haven", collection])


def vault(collection: str) -> dg.AssetKey:
    return dg.AssetKey(["vault", collection])


def release(agreement_id: str) -> dg.AssetKey:
    return dg.AssetKey(["release", agreement_id])


OBJECTION_REGISTER = dg.AssetKey(["governance", "objection_register"])
OBJECTION_RATES = dg.AssetKey(["governance", "objection_rates"])
OBJECTION_FEED = dg.AssetKey(["governance", "objection_feed"])
PUBLISHED_FILES = dg.AssetKey(["published", "files"])


def published(output: str) -> dg.AssetKey:
    return dg.AssetKey(["published", output])
