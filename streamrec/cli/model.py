"""Model verbs: train, eval."""

from __future__ import annotations
