"""Value classes for what the hook's start and stop paths build (a plan, its mappings, the
sockets bound): what a frozen dataclass gives them, without dataclasses.

`import dataclasses` brings inspect, ast, dis and tokenize along, and each @dataclass then
compiles its methods: ~6 ms of every container start (issue 12). A subclass lists its fields
in __slots__ and writes its __init__ with those names as parameters; Value gives equality,
hashing, repr and replace() over the slots. Attributes are not enforced read-only: they are
set once, in __init__.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Self


class Value:
    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{self.__class__.__name__}({fields})"

    def replace(self, **changes: object) -> Self:
        """A copy with some fields changed (dataclasses.replace)."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return self.__class__(**fields)
