"""savegame.plain_values: config objects <-> plain data, and the records read back from untrusted manifests."""

from __future__ import annotations

import argparse
import pathlib

import pytest
from _lithelp import Config

from savegame.errors import InvalidManifestError, StateMismatchError
from savegame.plain_values import from_plain, to_plain


def test_plain_state_comes_back_as_the_same_object() -> None:
    state = {"a": [1, (2, {"b": "c"})], "t": (None,)}
    plain, records = to_plain(state)
    assert plain is state and records == []
    assert from_plain(plain, records) is state


def test_nested_objects_round_trip() -> None:
    value = {"cfg": Config(hidden=2, data=pathlib.PurePosixPath("a/b")), "ns": [argparse.Namespace(x=(1, Config()))]}
    plain, records = to_plain(value)
    assert plain == {"cfg": {"hidden": 2, "dropout": 0.25, "data": "a/b"},
                     "ns": [{"x": (1, {"hidden": 16, "dropout": 0.25, "data": "data"})}]}  # fmt: skip
    back = from_plain(plain, records)
    assert back == value and type(back["cfg"].data) is pathlib.PurePosixPath


@pytest.mark.parametrize(
    ("records", "error", "match"),
    [
        ([{"path": ["x"], "kind": "dataclass", "class": "os:system"}], StateMismatchError, "not imported here"),
        ([{"path": ["x"], "kind": "dataclass", "class": "builtins:dict"}], StateMismatchError, "dataclass"),
        ([{"path": ["x"], "kind": "mapping", "class": "collections:Counter"}], InvalidManifestError, "unknown mapping"),
        ([{"path": ["x"], "kind": "path", "class": "Popen"}], InvalidManifestError, "not a path"),
        ([{"path": ["x"], "kind": "pickle", "class": "x:y"}], InvalidManifestError, "unknown kind"),
        ([{"path": "x", "kind": "namespace", "class": "argparse:Namespace"}], InvalidManifestError, "must be a list"),
        ({"path": ["x"]}, InvalidManifestError, "list of dicts"),
    ],
)
def test_forged_records_never_call_what_they_name(records: object, error: type[Exception], match: str) -> None:
    """A record is untrusted manifest data: it can only pick among the fixed rebuilders, and a dataclass
    only from a module already imported (``os.system`` is neither a dataclass nor called)."""
    with pytest.raises(error, match=match):
        from_plain({"x": {"k": "v"}}, records, where="item")


def test_a_dataclass_with_other_fields_is_refused() -> None:
    plain, records = to_plain({"c": Config()})
    del plain["c"]["dropout"]
    with pytest.raises(StateMismatchError, match="fields"):
        from_plain(plain, records)
