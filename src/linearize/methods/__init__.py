"""Linearization methods. A method says which mixer replaces softmax attention, which stages train, and its
defaults; adding one is a module here and one line in `METHODS`."""

from __future__ import annotations

from linearize.errors import LinearizeError
from linearize.methods.base import Method
from linearize.methods.liger import Liger
from linearize.methods.lolcats import Lolcats
from linearize.methods.window import Window

METHODS: dict[str, Method] = {method.name: method for method in (Lolcats(), Liger(), Window())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LinearizeError(f"unknown method '{name}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
