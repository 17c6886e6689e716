"""The knowledge-base readers by format name, filled by ``register_reader`` as each reader module loads."""

from __future__ import annotations

from typing import Callable

from ..base import KnowledgeBase

READERS: dict[str, Callable[..., KnowledgeBase]] = {}


def register_reader(name: str) -> Callable[[Callable[..., KnowledgeBase]], Callable[..., KnowledgeBase]]:
    def deco(fn: Callable[..., KnowledgeBase]) -> Callable[..., KnowledgeBase]:
        READERS[name] = fn
        return fn

    return deco
