"""kiln.options: plain values checked against option dataclasses, for passes and targets alike."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from kiln import options
from kiln.errors import KilnError, RecipeError


@dataclasses.dataclass
class Example:
    scale: float = 1.0
    bits: int = 4
    mode: Literal["a", "b"] = "a"
    names: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.bits > 8:
            raise ValueError(f"bits must be <= 8, got {self.bits}")


def test_values_are_converted_and_checked():
    built = options.build(Example, {"scale": 2, "mode": "b", "names": ["x"], "limit": None}, owner="pass 'p'")
    assert built == Example(scale=2.0, mode="b", names=["x"], limit=None)
    assert isinstance(built.scale, float)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"speed": 1}, "pass 'p' has no option 'speed'; its options are: bits, limit, mode, names, scale"),
        ({"scale": "1"}, "option 'scale' must be float"),
        ({"bits": True}, "option 'bits' must be int"),
        ({"mode": "c"}, "option 'mode' must be one of 'a', 'b'"),
        ({"names": "x"}, "option 'names' must be a list"),
        ({"limit": "3"}, "option 'limit' has the wrong type"),
        ({"bits": 9}, "pass 'p': bits must be <= 8"),
    ],
)
def test_bad_values_name_the_option(values, fragment):
    with pytest.raises(RecipeError) as info:
        options.build(Example, values, owner="pass 'p'", error=RecipeError)
    assert fragment in str(info.value)


def test_default_error_is_kiln_error():
    with pytest.raises(KilnError, match="target 't' has no option 'x'"):
        options.build(Example, {"x": 1}, owner="target 't'")
