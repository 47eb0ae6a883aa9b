"""Checkpoint names: the one set of name rules, Keras/Lightning-style templates, and de-duplication.

Two rules, both here (one job, one place):

* :func:`check_checkpoint_name`, for every name used to *find* a checkpoint or a file (open, list,
  delete, quarantine, a file inside a transaction): one path component, not hidden, no separator or
  NUL. It is deliberately lenient so that a checkpoint which exists keeps loading.
* :func:`validate_name`, for every *new* checkpoint name, whoever chooses it: ``savegame.save(path)``,
  ``ckpt.save(name=...)``, templates, per-rank saves. Storage ``begin`` (local and remote) applies it,
  so all save paths agree.

A checkpoint name becomes a directory name under the checkpoint root, so it must be one safe path
component on every platform the checkpoint may be copied to. :func:`validate_name` enforces that:

* not empty, at most :data:`MAX_NAME_BYTES` bytes in UTF-8 (200 characters for ASCII names), so
  staging suffixes still fit in the usual 255-byte file name limit;
* no path separator (``/``, ``\\``), no NUL or other control character, none of the characters
  Windows refuses in file names (``< > : " | ? *``);
* not ``.`` or ``..``, and not starting with ``.``: dot-names are reserved for savegame's staging
  and internal directories, which listing and retention skip;
* no leading or trailing whitespace and no trailing ``.`` (Windows silently strips those).

A :class:`NameTemplate` such as ``"mobilenet_v2_{epoch:02d}_{val_accuracy:.3f}"`` or
``"epoch={epoch:02d}-val_acc={val_acc:.3f}"`` is checked when it is built, so a bad template fails
when the Checkpointer is configured rather than at the first save hours into training.
"""

from __future__ import annotations

import string
from collections.abc import Collection, Mapping

from savegame.errors import InvalidNameError

__all__ = ["MAX_NAME_BYTES", "NameTemplate", "check_checkpoint_name", "unique_name", "validate_name"]

MAX_NAME_BYTES = 200
"""Longest allowed checkpoint name, in UTF-8 bytes."""

_FORBIDDEN_CHARACTERS = frozenset('/\\<>:"|?*')
_INTEGER_FIELDS = frozenset({"epoch", "step"})
_SAMPLE_INT = 1
_SAMPLE_FLOAT = 1.5


def _name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid checkpoint name, or None when it is."""
    if not isinstance(name, str):
        return f"a name must be a str, not {type(name).__name__}"
    if not name:
        return "the name is empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "the name is not valid Unicode (lone surrogate)"
    if size > MAX_NAME_BYTES:
        return f"the name is {size} bytes long in UTF-8; the limit is {MAX_NAME_BYTES}"
    for char in name:
        if char in "/\\":
            return f"the name contains a path separator {char!r}"
        if char == "\0":
            return "the name contains a NUL character"
        if ord(char) < 32 or ord(char) == 127:
            return f"the name contains a control character {char!r}"
        if char in _FORBIDDEN_CHARACTERS:
            return f"the name contains {char!r}, which Windows does not allow in file names"
    if name in (".", ".."):
        return f"{name!r} is not a usable directory name"
    if name.startswith("."):
        return "names starting with '.' are reserved for savegame's staging and internal directories"
    if name != name.strip():
        return "the name starts or ends with whitespace"
    if name.endswith("."):
        return "the name ends with '.', which Windows strips"
    return None


def check_checkpoint_name(name: str) -> str:
    """``name`` if it is one path component, not hidden, without separators or NUL (the rule for
    finding existing checkpoints and files); :class:`InvalidNameError` otherwise."""
    if (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or len(name) > 255
    ):
        raise InvalidNameError(
            f"invalid checkpoint name {name!r}: it must be one path component, not start with '.', "
            "and contain no '/', '\\' or NUL"
        )
    return name


def validate_name(name: str) -> str:
    """Return ``name`` unchanged if it is a valid name for a new checkpoint, else raise InvalidNameError.

    Used by every save: ``savegame.save`` targets, ``ckpt.save(name=...)``, templates and per-rank
    saves (storage ``begin``); the rules are in the module docstring.
    """
    problem = _name_problem(name)
    if problem is not None:
        raise InvalidNameError(f"invalid checkpoint name {name!r}: {problem}")
    return name


def unique_name(name: str, existing: Collection[str]) -> str:
    """``name`` if it is not in ``existing``, else the first free ``name-v1``, ``name-v2``, ...

    The Lightning convention for a name that is already taken. Never returns an existing name; raises
    :class:`InvalidNameError` if ``name`` (or the suffixed name) is not a valid name.
    """
    validate_name(name)
    taken = set(existing)
    candidate = name
    version = 0
    while candidate in taken:
        version += 1
        candidate = f"{name}-v{version}"
    return validate_name(candidate)


class NameTemplate:
    """A checkpoint name pattern with ``str.format``-style placeholders, validated on construction.

    Placeholders are ``{epoch}``, ``{step}`` (always the values passed to :meth:`format`, never a
    metric of that name) and any metric name, each with an optional numeric format spec
    (``{epoch:02d}``, ``{val_loss:.4f}``). ``{{`` and ``}}`` stand for literal braces. Refused, with
    :class:`InvalidNameError`: an empty template, positional fields (``{}``, ``{0}``), attribute or
    index access (``{a.b}``, ``{a[0]}``), conversions (``{a!r}``), unbalanced braces, placeholders that
    are not Python identifiers, format specs that cannot format the field's number type (ints for
    ``epoch``/``step``, floats for metrics; ``{epoch:s}`` fails), and any literal text or sample
    result that breaks :func:`validate_name`.
    """

    __slots__ = ("_fields", "_parts", "_template")

    def __init__(self, template: str) -> None:
        self._template = template
        self._parts = self._parse(template)
        self._fields = frozenset(field for _, field, _ in self._parts if field is not None)
        sample = self._render(
            {field: _SAMPLE_INT if field in _INTEGER_FIELDS else _SAMPLE_FLOAT for field in self._fields}
        )
        problem = _name_problem(sample)
        if problem is not None:
            raise InvalidNameError(f"invalid name template {template!r}: it gives names like {sample!r}, and {problem}")

    def _error(self, template: str, problem: str) -> InvalidNameError:
        """An InvalidNameError quoting the template and the problem."""
        return InvalidNameError(f"invalid name template {template!r}: {problem}")

    def _parse(self, template: str) -> tuple[tuple[str, str | None, str], ...]:
        """Split ``template`` into (literal, field, spec) parts, refusing everything not allowed."""
        if not isinstance(template, str):
            raise InvalidNameError(f"a name template must be a str, not {type(template).__name__}")
        if not template:
            raise self._error(template, "the template is empty")
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise self._error(template, f"malformed placeholder or unbalanced braces ({exc})") from None
        parts: list[tuple[str, str | None, str]] = []
        for literal, field, raw_spec, conversion in parsed:
            problem = _name_problem(f"x{literal}x") if literal else None
            if problem is not None:
                raise self._error(template, f"in the text {literal!r}: {problem}")
            if field is None:
                parts.append((literal, None, ""))
                continue
            if field == "" or field.isdigit():
                raise self._error(
                    template,
                    "positional fields ({} or {0}) are not allowed; name them, e.g. {epoch}",
                )
            if "." in field or "[" in field:
                raise self._error(template, f"attribute or index access in {{{field}}} is not allowed")
            if conversion is not None:
                raise self._error(template, f"conversions ({{{field}!{conversion}}}) are not allowed")
            if not field.isidentifier():
                raise self._error(template, f"placeholder {{{field}}} is not a Python identifier")
            spec = raw_spec or ""
            sample: int | float = _SAMPLE_INT if field in _INTEGER_FIELDS else _SAMPLE_FLOAT
            try:
                format(sample, spec)
            except (ValueError, TypeError) as exc:
                kind = "an integer" if field in _INTEGER_FIELDS else "a float"
                raise self._error(
                    template, f"format spec {spec!r} of {{{field}}} cannot format {kind} ({exc})"
                ) from None
            parts.append((literal, field, spec))
        return tuple(parts)

    def _render(self, values: Mapping[str, int | float]) -> str:
        """The parts joined with ``values`` formatted in (every field must be present)."""
        chunks: list[str] = []
        for literal, field, spec in self._parts:
            chunks.append(literal)
            if field is not None:
                chunks.append(format(values[field], spec))
        return "".join(chunks)

    @property
    def template(self) -> str:
        """The template text as given."""
        return self._template

    @property
    def fields(self) -> frozenset[str]:
        """The placeholder names the template uses."""
        return self._fields

    def format(self, *, epoch: int | None, step: int | None, metrics: Mapping[str, float]) -> str:
        """The checkpoint name for these values, validated like :func:`validate_name`.

        Raises :class:`InvalidNameError` naming the placeholder and the available keys when a field
        has no value (``epoch``/``step`` None, metric absent), when a value cannot be formatted, or
        when the result is not a valid name (too long, a separator from a fill character, ...).
        Metric values are converted with ``float()`` first, so ints and numpy scalars work.
        """
        values: dict[str, int | float] = {}
        for field in self._fields:
            if field == "epoch" and epoch is not None:
                values[field] = epoch
            elif field == "step" and step is not None:
                values[field] = step
            elif field not in _INTEGER_FIELDS and field in metrics:
                raw = metrics[field]
                try:
                    values[field] = float(raw)
                except (TypeError, ValueError):
                    raise InvalidNameError(
                        f"name template {self._template!r}: metric {field!r} is not a number: {raw!r}"
                    ) from None
            else:
                available = [k for k, v in (("epoch", epoch), ("step", step)) if v is not None]
                available += sorted(k for k in metrics if k not in _INTEGER_FIELDS)
                raise InvalidNameError(
                    f"name template {self._template!r} needs a value for {{{field}}}, which was not "
                    f"given (available: {', '.join(available) or 'none'})"
                )
        try:
            name = self._render(values)
        except (TypeError, ValueError) as exc:
            raise InvalidNameError(f"name template {self._template!r}: cannot format the values ({exc})") from None
        problem = _name_problem(name)
        if problem is not None:
            raise InvalidNameError(f"name template {self._template!r} gave the invalid name {name!r}: {problem}")
        return name

    def __repr__(self) -> str:
        return f"NameTemplate({self._template!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NameTemplate):
            return NotImplemented
        return self._template == other._template

    def __hash__(self) -> int:
        return hash(self._template)
