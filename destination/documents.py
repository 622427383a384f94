"""Reading Kubernetes-style documents with errors that name the field at fault.

:class:`Doc` wraps one mapping together with the path it was found at, so a parser can say
``spec.ports[0].targetPort: must be a port number or name`` instead of raising a KeyError.
Shared by :mod:`destination.parsing` and :mod:`destination.policy_parsing`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from destination.errors import InvalidResource
from destination.model import labels_of
from destination.resources import LabelSelector, Meta, TargetRef, check_default_policy
from pki.durations import parse_duration
from pki.errors import PKIError
from pki.names import check_label

T = TypeVar("T")


class Doc:
    """A dict with the path it was found at, so that every error names its field."""

    def __init__(self, data: Any, path: str = "") -> None:
        if not isinstance(data, dict):
            raise InvalidResource(f"must be a mapping, not {_type(data)}", field=path or "document")
        self.data = data
        self.path = path

    def _field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> InvalidResource:
        return InvalidResource(message, field=self._field(key))

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return default
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, not {value!r}")
        return value

    def number(
        self,
        key: str,
        default: int | None = None,
        *,
        required: bool = False,
        lo: int = 0,
        hi: int = 65535,
    ) -> Any:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return default
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.fail(key, f"must be an integer in {lo}..{hi}, not {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {value!r}")
        return value

    def port_or_name(self, key: str, *, required: bool = True) -> Any:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return None
        if isinstance(value, str) and not value.isdigit():
            return value
        try:
            port = int(value)
        except (TypeError, ValueError):
            raise self.fail(key, f"must be a port number or name, not {value!r}") from None
        if isinstance(value, bool) or not 1 <= port <= 65535:
            raise self.fail(key, f"port {value!r} is outside 1..65535")
        return port

    def duration(self, key: str) -> timedelta | None:
        value = self.data.get(key)
        if value is None:
            return None
        try:
            return parse_duration(str(value))
        except PKIError as e:
            raise self.fail(key, str(e)) from None

    def require(self, key: str) -> Doc:
        """The mapping at ``key``, which must be present."""
        value = self.data.get(key)
        if value is None:
            raise self.fail(key, "is required")
        return Doc(value, self._field(key))

    def child(self, key: str, *, required: bool = False) -> Doc | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return None
        return Doc(value, self._field(key))

    def sequence(self, key: str, *, required: bool = False) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return []
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, not {_type(value)}")
        return value

    def docs(self, key: str, *, required: bool = False) -> list[Doc]:
        return [
            Doc(v, f"{self._field(key)}[{i}]")
            for i, v in enumerate(self.sequence(key, required=required))
        ]

    def strings(self, key: str) -> tuple[str, ...]:
        out = []
        for i, v in enumerate(self.sequence(key)):
            if not isinstance(v, str) or not v:
                raise InvalidResource(
                    f"must be a non-empty string, not {v!r}", field=f"{self._field(key)}[{i}]"
                )
            out.append(v)
        return tuple(out)

    def string_map(self, key: str) -> dict[str, str]:
        value = self.data.get(key) or {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, not {_type(value)}")
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str | int | float | bool):
                raise self.fail(key, f"entry {k!r} must map a string to a string")
        return {k: str(v) for k, v in value.items()}


def _type(value: Any) -> str:
    names: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)


def guard(doc: Doc, key: str, fn: Callable[[], T]) -> T:
    """Run a value constructor, turning its ValueError into an error naming ``key``."""
    try:
        return fn()
    except InvalidResource:
        raise
    except (ValueError, PKIError) as e:
        raise doc.fail(key, str(e)) from None


# --- common ---------------------------------------------------------------------------------


def parse_meta(obj: Doc, *, namespaced: bool = True) -> Meta:
    meta = obj.child("metadata", required=True)
    assert meta is not None
    name = meta.text("name", required=True)
    namespace = meta.text("namespace", "default")
    guard(meta, "namespace", lambda: check_label("namespace", namespace))
    return Meta(
        name,
        namespace,
        labels_of(meta.string_map("labels")),
        labels_of(meta.string_map("annotations")),
    )


def annotation(meta: Meta, suffix: str) -> str | None:
    """``config.trustmesh.io/<suffix>``, else Linkerd's ``config.linkerd.io/<suffix>``."""
    return meta.annotation(f"config.trustmesh.io/{suffix}") or meta.annotation(
        f"config.linkerd.io/{suffix}"
    )


def parse_ports_list(text: str, names: dict[str, int], field: str) -> frozenset[int]:
    """``25,587,4000-4010,http`` into a set of port numbers (names from ``names``)."""
    ports: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item in names:
            ports.add(names[item])
            continue
        lo_s, _, hi_s = item.partition("-")
        try:
            lo, hi = int(lo_s), int(hi_s or lo_s)
        except ValueError:
            raise InvalidResource(
                f"{item!r} is neither a port, a range like 4000-4010, nor a known port name",
                field=field,
            ) from None
        if not 1 <= lo <= hi <= 65535:
            raise InvalidResource(f"port range {item!r} is outside 1..65535", field=field)
        ports.update(range(lo, hi + 1))
    return frozenset(ports)


def meta_ports(meta: Meta, suffix: str, names: dict[str, int]) -> frozenset[int] | None:
    text = annotation(meta, suffix)
    if text is None:
        return None
    return parse_ports_list(text, names, f"metadata.annotations[{suffix}]")


def default_policy_annotation(meta: Meta) -> str | None:
    value = annotation(meta, "default-inbound-policy")
    if value is None:
        return None
    try:
        return check_default_policy(value)
    except ValueError as e:
        raise InvalidResource(
            str(e), field="metadata.annotations[default-inbound-policy]"
        ) from None


def parse_selector(doc: Doc | None) -> LabelSelector:
    if doc is None:
        return LabelSelector()
    exprs = []
    for e in doc.docs("matchExpressions"):
        op = e.text("operator", required=True)
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise e.fail("operator", f"{op!r} is not one of In, NotIn, Exists, DoesNotExist")
        exprs.append((e.text("key", required=True), op, e.strings("values")))
    return LabelSelector(labels_of(doc.string_map("matchLabels")), tuple(exprs))


def parse_target_ref(doc: Doc, kinds: tuple[str, ...]) -> TargetRef:
    kind = doc.text("kind", required=True)
    if kind not in kinds:
        raise doc.fail("kind", f"{kind!r} is not one of {', '.join(kinds)}")
    return TargetRef(
        kind,
        doc.text("name", required=True),
        doc.text("group", ""),
        doc.text("namespace"),
        doc.number("port", lo=1),
    )
