"""Shared fixtures: every test gets its own haven home, store and Dagster instance.

Full-job runs are expensive, so a module whose tests all start from the same run builds it once
(a module-scoped fixture using ``building_haven``) and overrides ``prebuilt`` to return its root:
then ``home`` and ``dagster_instance`` are a private copy of that haven and its Dagster storage,
which a test may read or change freely without re-running the job.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest
import yaml

from safehaven.cli.common import PASSPHRASE_ENV
from safehaven.core.home import Home
from safehaven.core.keys import VAULT, Custodian, KeyRing
from safehaven.core.store import Store
from tests.forkserver import ForkServer

#: The key custodian's passphrase in tests (given to CLI commands through the environment).
TEST_PASSPHRASE = "correct horse battery staple (tests)"
#: A cheaper scrypt work factor for keys sealed in tests; production seals with keys.SCRYPT_N
#: (the factor is stored in each sealed file, so opening is unchanged).
TEST_SCRYPT_N = 2**10


def test_custodian(passphrase: str = TEST_PASSPHRASE) -> Custodian:
    """The key custodian of a test haven."""
    return Custodian.of(passphrase, scrypt_n=TEST_SCRYPT_N)


test_custodian.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def custodian_ring(home: Home) -> KeyRing:
    """The key ring of the custodian's commands (opens the sealed vault key)."""
    return KeyRing(home.keys, test_custodian())


def with_vault_keys(home: Home) -> Home:
    """Set up as a custodian sets up a haven: the vault pair, its private half sealed under
    ``TEST_PASSPHRASE`` (which CLI commands read from $SAFEHAVEN_CUSTODIAN_PASSPHRASE)."""
    ring = custodian_ring(home)
    if not ring.exists(VAULT):
        ring.create_keypair(VAULT)
    return home


#: The project's Dagster instance settings (``make install`` copies them into $DAGSTER_HOME).
DAGSTER_YAML = Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml"


def instance_settings(dagster_home: Path) -> dict[str, object]:
    """``dg.instance_for_test`` arguments for an instance under ``dagster_home`` with the project's
    instance storage (``deploy/dagster.yaml``'s ``storage``: ``resources.instance_storage``)."""
    storage = yaml.safe_load(DAGSTER_YAML.read_text())["storage"]
    storage["custom"]["config"]["base_dir"] = str(dagster_home)
    return {"temp_dir": str(dagster_home), "overrides": {"storage": storage}}


def pytest_configure(config: pytest.Config) -> None:
    """One DuckDB thread per store connection in this process (``store.DEFAULT_THREADS``): the
    suite's workers already use every core. So do the commands the tests fork from a warm
    interpreter (``tests.forkserver``); those started otherwise (``make run``, a run launched
    through Dagster's code server) keep DuckDB's default, as in production."""
    from safehaven.core import store

    store.DEFAULT_THREADS = 1


@contextmanager
def building_haven(root: Path) -> Iterator[tuple[Home, object]]:
    """An empty haven under ``root`` for a module- or session-scoped fixture to run jobs in.

    Lays ``root`` out as ``home`` does a test's directory (``haven/`` and ``dagster_home/``), so
    ``prebuilt`` can copy it; $SAFEHAVEN_HOME and $DAGSTER_HOME point there only inside the block.
    The project's agreements are adopted in its store as the governance lead would
    (``tests.governance_helpers.adopt_project_agreements``: a file's block alone approves nothing).
    Yields the home and a Dagster instance whose storage is ``root/dagster_home``.
    """
    import dagster as dg

    from tests.governance_helpers import adopt_project_agreements

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEHAVEN_HOME", str(root / "haven"))
        mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        mp.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
        (root / "dagster_home").mkdir()
        home = with_vault_keys(Home(root / "haven").ensure())
        adopt_project_agreements(home)
        with dg.instance_for_test(**instance_settings(root / "dagster_home")) as instance:
            yield home, instance


@pytest.fixture
def prebuilt() -> Path | None:
    """The root of a haven built once for the module (see ``building_haven``), or None for an empty home.

    Override in a test module to start every test's ``home`` (and ``dagster_instance``) from a
    copy of that haven. Copying the whole root keeps the encrypted store and its keys together.
    """
    return None


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prebuilt: Path | None) -> Home:
    """A haven home in a temporary directory, set as $SAFEHAVEN_HOME: empty but for the vault's
    key pair (``with_vault_keys``), or a copy of ``prebuilt``."""
    if prebuilt is not None:
        shutil.copytree(prebuilt, tmp_path, dirs_exist_ok=True)
    root = tmp_path / "haven"
    monkeypatch.setenv("SAFEHAVEN_HOME", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir(exist_ok=True)
    monkeypatch.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
    return with_vault_keys(Home(root).ensure())


def build_populated(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    patients: int = 300,
    set_up: Callable[[Path], Home] = lambda root: with_vault_keys(Home(root).ensure()),
) -> Path:
    """The root of a haven made by ``set_up`` (by default as the ``home`` fixture makes one) and
    ``tests.unit.populate.populated`` with ``patients`` (seed 7; no Dagster), in a directory of its
    own named after ``name``: a template for a module- or session-scoped fixture, to be copied into
    a test's home (``copy_haven``), never changed."""
    from tests.unit.populate import populated

    root = tmp_path_factory.mktemp(name) / "haven"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEHAVEN_HOME", str(root))
        mp.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
        populated(set_up(root), patients=patients)
    return root


@pytest.fixture(scope="session")
def populated_haven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The haven root ``tests.unit.populate.populated`` makes (300 patients, seed 7; no Dagster).

    Built once per session (per xdist worker); never change it: ``copy_haven`` it into a test's home.
    """
    return build_populated(tmp_path_factory, "populated")


def copy_haven(template: Path, home: Home) -> Home:
    """``home`` (fresh from the ``home`` fixture) filled with a copy of the haven at ``template``.

    The whole tree is copied, so the encrypted store travels with its keys.
    """
    shutil.copytree(template, home.root, dirs_exist_ok=True)
    return home


@pytest.fixture
def store(home: Home) -> Store:
    return Store(home)


#: the longest needle :func:`needles_in` puts in its prefix tree: the pattern nests a group per
#: byte, and Python's parser stops near 500 levels
TREE_DEPTH = 200


def needles_in(needles: list[bytes]) -> Callable[[bytes], set[bytes]]:
    """A search for ``needles``: called on some bytes, it returns the needles they hold.

    One pass of a regular expression over their prefix tree, looked for at every byte: the plain
    alternation ``a|b|c...`` makes Python's engine try every needle at every byte (an output
    test's 1,500 identifiers over its published files: 13 s), the tree only those that share
    the bytes read so far (0.1 s), and a needle-by-needle ``in`` over a file that holds some is
    as slow again. At each byte the tree's longest needle is taken, with every shorter needle it
    extends (they start at the same byte). Needles the tree cannot hold (an empty one, or one
    longer than :data:`TREE_DEPTH`) are searched one by one, so the answer is the same for any."""
    if not needles or not all(needles) or max(map(len, needles)) > TREE_DEPTH:
        return lambda data: {n for n in needles if n in data}
    tree: dict = {}
    for needle in needles:
        node = tree
        for byte in needle:
            node = node.setdefault(byte, {})
        node[None] = {}

    def branch(node: dict) -> bytes:
        parts = [
            re.escape(bytes([byte])) + branch(child)
            for byte, child in sorted(n for n in node.items() if n[0] is not None)
        ]
        if not parts:
            return b""
        choice = parts[0] if len(parts) == 1 else b"(?:" + b"|".join(parts) + b")"
        return b"(?:" + choice + b")?" if None in node else choice

    pattern = re.compile(b"(?=(" + branch(tree) + b"))")
    wanted, lengths = set(needles), sorted({len(n) for n in needles})

    def search(data: bytes) -> set[bytes]:
        longest = {m.group(1) for m in pattern.finditer(data)}
        return {m[:n] for m in longest for n in lengths if n <= len(m) and m[:n] in wanted}

    return search


def scan_for(root: Path, needles: list[bytes]) -> dict[str, list[str]]:
    """Every file under ``root`` that holds any needle in its plain bytes (path -> needles, in
    the order given; bytes that are not text shown escaped), found by one pass of
    :func:`needles_in` over each file."""
    hits: dict[str, list[str]] = {}
    search = needles_in(needles)
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            held = search(path.read_bytes())
            if held:
                hits[str(path)] = [n.decode(errors="backslashreplace") for n in needles if n in held]
    return hits


NHS_LIKE = re.compile(rb"999[ -]?\d{3}[ -]?\d{4}")


def seeded_nhs_numbers(incoming: Path) -> set[str]:
    """Canonical NHS numbers in every generated drop under ``incoming`` (read with DuckDB)."""
    found: set[str] = set()
    for path in incoming.rglob("*.csv"):
        rows = duckdb.execute(
            "SELECT DISTINCT regexp_replace(nhs_number, '[^0-9]', '', 'g') FROM read_csv(?, all_varchar=true)",
            [str(path)],
        ).fetchall()
        found |= {r[0] for r in rows if r[0]}
    return found


def leaked_nhs_numbers(roots: list[Path], seeded: set[str]) -> dict[str, int]:
    """Files under ``roots`` holding any seeded NHS number in plain bytes, in any formatting."""
    hits: dict[str, int] = {}
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            numbers = {re.sub(rb"[^0-9]", b"", m).decode() for m in NHS_LIKE.findall(data)}
            leaked = numbers & seeded
            if leaked:
                hits[str(path)] = len(leaked)
    return hits


@pytest.fixture(scope="session")
def forkserver() -> Iterator[ForkServer]:
    """A warm interpreter that runs commands as processes of their own (``tests.forkserver``),
    one per test worker: a test starting many ``safehaven`` processes pays their imports once."""
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture
def dagster_instance(tmp_path: Path, home: Home):
    """A Dagster instance whose event storage lives under the test's own directory.

    Depends on ``home`` so a copied Dagster storage (``prebuilt``) is in place before it opens.
    """
    import dagster as dg

    with dg.instance_for_test(**instance_settings(tmp_path / "dagster_home")) as instance:
        yield instance


# --- scheduling on pytest-xdist workers (``make test``: ``--dist loadgroup --no-loadscope-reorder``) ---

#: The crash matrix is split into this many groups, so its cases run on every worker (each
#: group builds its own no-crash run once); any other module is one group, so a module's
#: shared full-job run is still built once.
CRASH_GROUPS = 2
CRASH_GROUP = "crash-matrix-{}"
#: Marks of the long end-to-end tests: a module holding one is scheduled before the others.
HEAVY_MARKS = ("slow", "deploy")


def crash_group(index: int) -> pytest.MarkDecorator:
    """The ``xdist_group`` of the crash matrix's ``index``-th case."""
    return pytest.mark.xdist_group(CRASH_GROUP.format(index % CRASH_GROUPS))


def _group(item: pytest.Item) -> str:
    marks = [m.kwargs.get("name", m.args[0] if m.args else "") for m in item.iter_markers("xdist_group")]
    return marks[0] if marks else item.nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in an ``xdist_group`` (its module's unless it names one) and the longest groups
    first: the crash matrix's, then the modules with a slow or deploy test, then the rest in
    collection order. The workers take groups from that queue as they finish one, so the long
    ones start first and the two workers end at about the same time (the longest job first).

    Runs before pytest-xdist's own hook (``tryfirst``), which turns each test's ``xdist_group``
    into the unit it schedules: marked after it, every test was a unit of its own, so a module's
    shared run was built again on each worker that took one of its tests.
    """
    heavy = {_group(i) for i in items if any(i.get_closest_marker(m) for m in HEAVY_MARKS)}
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_group(item)))

    def rank(item: pytest.Item) -> int:
        group = _group(item)
        return 0 if group.startswith(CRASH_GROUP.format("")) else 1 if group in heavy else 2

    items.sort(key=rank)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Refuse to run when pytest-xdist's ``loadgroup`` did not take: every test would be scheduled
    alone and each module's shared run built again on every worker (pytest 9.2 with
    pytest-xdist 3.8 did exactly that, silently; pinned in ``pyproject.toml``)."""
    if getattr(session.config.option, "loadgroup", False) and any("@" not in item.nodeid for item in session.items):
        raise pytest.UsageError(
            "pytest-xdist's --dist loadgroup did not mark the tests with their group; "
            "check the pinned pytest and pytest-xdist versions (pyproject.toml)"
        )
