"""``safehaven review``: the output checkers' commands (SATRE 3.3.04-3.3.05; Five Safes "safe outputs").

A request is named by the release id it would create (``research-hes-asc-linked-r0002``).
Reviewers name themselves with ``--by``; neither may be the person who operated the run, and
one person cannot approve twice. Every decision is audited (``safehaven.share.review``).

Blinded review (SATRE 3.3.05; the OpenSAFELY Airlock): while a request awaits a decision,
``list`` and ``show`` (text and ``--json``) say only how many of the reviews needed are in,
never who has reviewed or any decision or comment (``safehaven.share.review.reviews_view``);
once it has left review everything is shown.
"""

from __future__ import annotations

import json
from typing import Any

import click

from safehaven.cli.common import ensure_home as _home
from safehaven.cli.common import fail as _fail


@click.group("review")
def review_group() -> None:
    """Release requests waiting for output checking: list, show, approve, return, reject."""


@review_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Every request, not only those waiting.")
def list_requests(show_all: bool) -> None:
    """Requests waiting for a decision (or every request with --all)."""
    from safehaven.core.store import Store
    from safehaven.share import review

    home = _home()
    with Store(home).connect() as con:
        found = review.requests(con, states=None if show_all else review.OPEN)
        views = {r.release_id: review.reviews_view(con, r) for r in found}
        unshredded = review.unshredded(con)
    if not found:
        click.echo("no release requests waiting" if not show_all else "no release requests")
    for r in found:
        click.echo(
            f"{r.release_id:<40} {r.state:<16} {r.rule:<28} {r.identifiability:<13} "
            f"prepared {r.prepared_at:%Y-%m-%d %H:%M} by {r.prepared_by}; {_reviews_line(views[r.release_id])}"
        )
    for rid, why in unshredded:
        click.echo(f"not shredded: the files of {rid} (it will never leave): {why}")


def _reviews_line(view: dict[str, Any]) -> str:
    """``N of M reviews in`` while blinded, else who approved (``safehaven.share.review.reviews_view``)."""
    if view["blinded"]:
        return f"{view['reviews_in']} of {view['reviews_needed']} reviews in"
    return f"approved by {', '.join(view['approved_by']) or 'nobody'}"


def _show_reviews(view: dict[str, Any], comment: str | None) -> None:
    """The reviews part of ``review show``: counts while blinded, every decision afterwards."""
    if view["blinded"]:
        click.echo(
            f"reviews: {view['reviews_in']} of {view['reviews_needed']} in; who reviewed and their decisions "
            "and comments stay hidden until the request leaves review (blinded review)"
        )
        return
    click.echo(_reviews_line(view))
    if comment:
        click.echo(f"comment: {comment}")
    for d in view["decisions"]:
        note = f" ({d['comment']})" if d["comment"] else ""
        click.echo(f"  {d['decided_at'][:16]}  {d['reviewer']}: {d['decision']} {d['file']}{note}")


@review_group.command("show")
@click.argument("release_id")
@click.option("--json", "as_json", is_flag=True, help="The checker summary and the reviews as JSON.")
def show_request(release_id: str, as_json: bool) -> None:
    """The checker summary of a request (counts only, never values) and its reviews (blinded while waiting)."""
    from safehaven.core.store import Store
    from safehaven.share import checker, review

    home = _home()
    with Store(home).connect() as con:
        try:
            req = review.get(con, release_id)
        except review.ReviewError as exc:
            _fail(str(exc))
        view = review.reviews_view(con, req)
    if as_json:
        click.echo(json.dumps({**req.summary, "reviews": {"state": req.state, **view}}, indent=2))
        return
    click.echo(f"{req.release_id}: {req.state}; rule {req.rule} ({req.rule_reason})")
    click.echo(f"prepared by {req.prepared_by}")
    _show_reviews(view, None if view["blinded"] else req.comment)
    click.echo("files (SHA-256 pinned at preparation):")
    for f in req.files:
        click.echo(f"  {f['name']}  {f['sha256']}")
    click.echo(checker.to_markdown(req.summary))


def _run(action: str, release_id: str, by: str, comment: str | None, files: tuple[str, ...]) -> None:
    from safehaven.cli.common import registry_from_env
    from safehaven.core.store import Store
    from safehaven.share import review

    home = _home()
    with Store(home).connect() as con:
        try:
            if action == "approve":
                req = review.approve(
                    con,
                    release_id,
                    by,
                    home=home,
                    registry=registry_from_env(),
                    files=list(files) or None,
                    comment=comment,
                )
            elif action == "return":
                req = review.return_request(con, release_id, by, comment or "", list(files) or None)
            elif action == "reject":
                req = review.reject(con, release_id, by, comment or "", list(files) or None)
            else:
                req = review.withdraw(con, release_id, by, comment or "")
        except review.ReviewError as exc:
            _fail(f"refused: {exc}")
        review.export(con, home)
    where = f" -> {home.releases / req.agreement_id / req.release_id}" if req.state == review.RELEASED else ""
    click.echo(f"{req.release_id}: {req.state}{where}")


_BY = click.option("--by", "by", required=True, help='The reviewer: "Name, Output checker".')
_FILES = click.option("--file", "files", multiple=True, help="Decide only this file (repeat); default every file.")


@review_group.command("approve")
@click.argument("release_id")
@_BY
@click.option("--comment", help="Optional note recorded with the decision.")
@_FILES
def approve_request(release_id: str, by: str, comment: str | None, files: tuple[str, ...]) -> None:
    """Approve the files of a request; released when its rule's reviewers have approved every file."""
    _run("approve", release_id, by, comment, files)


@review_group.command("return")
@click.argument("release_id")
@_BY
@click.option("--comment", required=True, help="What must change before it can be released.")
@_FILES
def return_request(release_id: str, by: str, comment: str, files: tuple[str, ...]) -> None:
    """Return a request with comments: nothing leaves; the next run prepares a corrected one."""
    _run("return", release_id, by, comment, files)


@review_group.command("reject")
@click.argument("release_id")
@_BY
@click.option("--comment", required=True, help="Why it must not leave.")
@_FILES
def reject_request(release_id: str, by: str, comment: str, files: tuple[str, ...]) -> None:
    """Reject a request: nothing leaves, and the same content is not offered again."""
    _run("reject", release_id, by, comment, files)


@review_group.command("withdraw")
@click.argument("release_id")
@_BY
@click.option("--comment", required=True, help="Why it is withdrawn.")
def withdraw_request(release_id: str, by: str, comment: str) -> None:
    """Withdraw an open request (e.g. its staged files were changed); the next run prepares again."""
    _run("withdraw", release_id, by, comment, ())


@review_group.command("release")
@click.argument("release_id")
@click.option("--by", "by", required=True, help='The vault custodian: "Name, Caldicott Guardian".')
def release_request(release_id: str, by: str) -> None:
    """Deliver an approved identifiable request (vault custodian only: needs the vault key)."""
    from safehaven.cli.common import registry_from_env
    from safehaven.cli.governance import require_governance_key
    from safehaven.core.store import Store
    from safehaven.share import review

    home = _home()
    require_governance_key(home, "releasing an identifiable request")
    with Store(home).connect() as con:
        try:
            req = review.deliver(con, release_id, home=home, registry=registry_from_env(), by=by)
        except review.ReviewError as exc:
            _fail(f"refused: {exc}")
    click.echo(f"{req.release_id}: {req.state} -> {home.releases / req.agreement_id / req.release_id}")


@review_group.command("resolve-shredding")
@click.argument("release_id")
@click.option("--by", "by", required=True, help='Who found and destroyed the files: "Name, role".')
@click.option("--reason", required=True, help="Where they were and how they were destroyed.")
def resolve_shredding(release_id: str, by: str, reason: str) -> None:
    """Record that the files of a request whose shredding was refused were found and destroyed (audited)."""
    from safehaven.core.store import Store
    from safehaven.share import review

    with Store(_home()).connect() as con:
        try:
            review.resolve_shredding(con, release_id, by=by, reason=reason)
        except review.ReviewError as exc:
            _fail(f"refused: {exc}")
    click.echo(f"{release_id}: the refused shredding is resolved by {by.strip()} (audited)")


def register(main: click.Group) -> None:
    """Add this area's commands to the CLI."""
    main.add_command(review_group)
