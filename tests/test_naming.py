"""Tests for savegame.format.naming: name validation, templates and de-duplication."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.errors import CheckpointError, InvalidNameError
from savegame.format.naming import MAX_NAME_BYTES, NameTemplate, unique_name, validate_name

# --------------------------------------------------------------------------------------------------
# validate_name


@pytest.mark.parametrize(
    "name",
    ["best", "epoch=03-val_acc=0.850", "mobilenet_v2_07_0.895", "step-100", "a.b", "a..b",
     "ckpt nan", "ключ", "x" * MAX_NAME_BYTES, "-0.5", "{braces}", "1"],
)  # fmt: skip
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("", "empty"),
        ("a/b", "path separator '/'"),
        ("a\\b", "path separator '\\\\'"),
        ("a\0b", "NUL"),
        ("a\nb", "control character"),
        (".", "not a usable directory name"),
        ("..", "not a usable directory name"),
        (".staging-1", "reserved"),
        (".hidden", "reserved"),
        ("../up", "path separator"),
        ("x" * (MAX_NAME_BYTES + 1), "201 bytes"),
        ("é" * 101, "202 bytes"),
        ("a:b", "Windows"),
        ("a*b", "Windows"),
        (" padded", "whitespace"),
        ("padded ", "whitespace"),
        ("trailing.", "ends with '.'"),
        ("\udcff", "not valid Unicode"),
    ],
)
def test_validate_name_rejects(name: str, needle: str) -> None:
    with pytest.raises(InvalidNameError) as excinfo:
        validate_name(name)
    message = str(excinfo.value)
    assert needle in message
    assert repr(name) in message


def test_validate_name_rejects_non_str() -> None:
    with pytest.raises(InvalidNameError, match="must be a str"):
        validate_name(3)  # type: ignore[arg-type]


def test_invalid_name_error_is_checkpoint_and_value_error() -> None:
    with pytest.raises(CheckpointError):
        validate_name("")
    with pytest.raises(ValueError, match="empty"):
        validate_name("")


# --------------------------------------------------------------------------------------------------
# unique_name


def test_unique_name() -> None:
    assert unique_name("best", []) == "best"
    assert unique_name("best", {"other"}) == "best"
    assert unique_name("best", ["best"]) == "best-v1"
    assert unique_name("best", ["best", "best-v1", "best-v3"]) == "best-v2"
    assert unique_name("best", ("best", "best-v1", "best-v2")) == "best-v3"


def test_unique_name_validates() -> None:
    with pytest.raises(InvalidNameError):
        unique_name("a/b", [])
    long = "x" * MAX_NAME_BYTES
    with pytest.raises(InvalidNameError, match="bytes"):
        unique_name(long, [long])


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(["a", "best", "epoch=01"]),
    taken=st.sets(st.integers(0, 12), max_size=12),
    include_name=st.booleans(),
)
def test_unique_name_never_returns_existing(name: str, taken: set[int], include_name: bool) -> None:
    existing = {f"{name}-v{i}" for i in taken} | ({name} if include_name else set())
    result = unique_name(name, existing)
    assert result not in existing
    assert result == name or result.startswith(f"{name}-v")
    if not include_name:
        assert result == name
    else:
        first_free = min(i for i in range(1, 20) if i not in taken)
        assert result == f"{name}-v{first_free}"


# --------------------------------------------------------------------------------------------------
# NameTemplate


def test_template_keras_style() -> None:
    t = NameTemplate("mobilenet_v2_{epoch:02d}_{val_accuracy:.3f}")
    assert t.fields == frozenset({"epoch", "val_accuracy"})
    assert t.template == "mobilenet_v2_{epoch:02d}_{val_accuracy:.3f}"
    name = t.format(epoch=7, step=None, metrics={"val_accuracy": 0.8951, "loss": 0.1})
    assert name == "mobilenet_v2_07_0.895"


def test_template_lightning_style_and_step() -> None:
    t = NameTemplate("epoch={epoch:02d}-val_acc={val_acc:.3f}")
    assert t.format(epoch=3, step=10, metrics={"val_acc": 0.85}) == "epoch=03-val_acc=0.850"
    assert NameTemplate("{step}").format(epoch=None, step=1200, metrics={}) == "1200"
    assert NameTemplate("final").fields == frozenset()
    assert NameTemplate("final").format(epoch=None, step=None, metrics={}) == "final"


def test_template_metric_values() -> None:
    t = NameTemplate("ckpt-{val_loss:.2f}")
    assert t.format(epoch=None, step=None, metrics={"val_loss": float("nan")}) == "ckpt-nan"
    assert t.format(epoch=None, step=None, metrics={"val_loss": float("inf")}) == "ckpt-inf"
    assert t.format(epoch=None, step=None, metrics={"val_loss": -0.5}) == "ckpt--0.50"
    assert t.format(epoch=None, step=None, metrics={"val_loss": 2}) == "ckpt-2.00"
    assert NameTemplate("m{val_loss}").format(epoch=None, step=None, metrics={"val_loss": 1}) == ("m1.0")


def test_template_escaped_braces() -> None:
    t = NameTemplate("{{run}}-{epoch}")
    assert t.fields == frozenset({"epoch"})
    assert t.format(epoch=2, step=None, metrics={}) == "{run}-2"


def test_template_epoch_and_step_come_from_arguments_not_metrics() -> None:
    t = NameTemplate("{epoch}")
    with pytest.raises(InvalidNameError, match=r"\{epoch\}"):
        t.format(epoch=None, step=None, metrics={"epoch": 3.0})


def test_template_missing_values_name_placeholder_and_available_keys() -> None:
    t = NameTemplate("{epoch:02d}-{val_acc:.3f}")
    with pytest.raises(InvalidNameError) as excinfo:
        t.format(epoch=1, step=5, metrics={"val_loss": 0.2, "loss": 0.3})
    message = str(excinfo.value)
    assert "{val_acc}" in message
    assert "available: epoch, step, loss, val_loss" in message
    with pytest.raises(InvalidNameError, match=r"\{epoch\}.*available: val_acc"):
        t.format(epoch=None, step=None, metrics={"val_acc": 0.5})
    with pytest.raises(InvalidNameError, match="available: none"):
        NameTemplate("{step}").format(epoch=None, step=None, metrics={})


def test_template_non_numeric_metric() -> None:
    with pytest.raises(InvalidNameError, match="not a number"):
        NameTemplate("{tag}").format(epoch=None, step=None, metrics={"tag": "x"})  # type: ignore[dict-item]


def test_template_validates_result() -> None:
    t = NameTemplate("ckpt-{val_loss:.1f}")
    with pytest.raises(InvalidNameError, match="bytes"):
        t.format(epoch=None, step=None, metrics={"val_loss": 1e250})
    with pytest.raises(InvalidNameError, match="gave the invalid name"):
        NameTemplate("{epoch}").format(epoch=10**201, step=None, metrics={})
    # a fill character that breaks the rules is caught when the template is built
    with pytest.raises(InvalidNameError, match=r"gives names like 'e\*\*\*1'"):
        NameTemplate("e{epoch:*>4}")


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("", "empty"),
        ("runs/{epoch}", "path separator '/'"),
        ("runs\\{epoch}", "path separator"),
        ("a\0{epoch}", "NUL"),
        (".", "not a usable directory name"),
        ("..", "not a usable directory name"),
        (".{epoch}", "reserved"),
        (".staging", "reserved"),
        ("../{epoch}", "path separator"),
        ("{}", "positional"),
        ("ckpt-{0}", "positional"),
        ("{a.b}", "attribute or index access"),
        ("{a[0]}", "attribute or index access"),
        ("{a!r}", "conversions"),
        ("{a!s:>3}", "conversions"),
        ("{epoch", "unbalanced braces"),
        ("epoch}", "unbalanced braces"),
        ("{epoch}}", "unbalanced braces"),
        ("{epoch:s}", "cannot format an integer"),
        ("{val_acc:d}", "cannot format a float"),
        ("{val_acc:.3q}", "format spec"),
        ("{epoch:{width}}", "format spec"),
        ("{val-acc}", "not a Python identifier"),
        ("{val acc}", "not a Python identifier"),
        ("{ epoch}", "not a Python identifier"),
        ("x" * 201, "bytes"),
        ("{epoch:0300d}", "bytes"),
        ("{epoch} ", "whitespace"),
        ("{epoch}.", "ends with '.'"),
    ],
)
def test_template_rejects(template: str, needle: str) -> None:
    with pytest.raises(InvalidNameError) as excinfo:
        NameTemplate(template)
    message = str(excinfo.value)
    assert needle in message
    assert repr(template) in message


def test_template_rejects_non_str() -> None:
    with pytest.raises(InvalidNameError, match="must be a str"):
        NameTemplate(None)  # type: ignore[arg-type]


def test_template_format_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        NameTemplate("{epoch}").format(1, None, {})  # type: ignore[call-arg]


def test_template_equality_and_repr() -> None:
    assert NameTemplate("{epoch}") == NameTemplate("{epoch}")
    assert NameTemplate("{epoch}") != NameTemplate("{step}")
    assert len({NameTemplate("{epoch}"), NameTemplate("{epoch}")}) == 1
    assert repr(NameTemplate("{epoch}")) == "NameTemplate('{epoch}')"


METRIC_NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True).filter(lambda s: s not in ("epoch", "step"))


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.from_regex(r"[A-Za-z0-9_=-]{1,20}", fullmatch=True),
    metric=METRIC_NAMES,
    epoch=st.integers(0, 10_000),
    value=st.floats(allow_nan=True, allow_infinity=True),
)
def test_template_results_are_always_valid_names(prefix: str, metric: str, epoch: int, value: float) -> None:
    t = NameTemplate(prefix + "_{epoch:03d}_{" + metric + ":.4f}")
    expected = f"{prefix}_{epoch:03d}_{value:.4f}"
    if len(expected) > MAX_NAME_BYTES:  # only a huge value makes the name too long
        with pytest.raises(InvalidNameError, match="bytes long"):
            t.format(epoch=epoch, step=None, metrics={metric: value})
        return
    name = t.format(epoch=epoch, step=None, metrics={metric: value})
    assert name == expected
    assert validate_name(name) == name
    assert name.startswith(f"{prefix}_{epoch:03d}_")
