"""Editable rules that name a series' sequence from its SeriesDescription / ProtocolName.

The shipped defaults live in ``default_rules.toml`` (package data); ``--rules FILE`` replaces them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SEQUENCES = ("t1", "t1ce", "t2", "flair", "dce")


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class SequenceRule:
    name: str
    include: tuple[re.Pattern, ...]
    exclude: tuple[re.Pattern, ...]
    temporal: bool


@dataclass(frozen=True)
class Rules:
    order: tuple[SequenceRule, ...]
    ignore: tuple[re.Pattern, ...]
    source: str

    def classify(self, description: str, protocol: str, temporal: bool) -> str | None:
        """The sequence a series is, or None (ignored or unrecognised)."""
        text = f"{description} | {protocol}"
        if any(rx.search(text) for rx in self.ignore):
            return None
        for rule in self.order:
            if rule.temporal != temporal:
                continue
            if any(rx.search(text) for rx in rule.include) and not any(
                    rx.search(text) for rx in rule.exclude):
                return rule.name
        return None


def _compile(patterns, where: str) -> tuple[re.Pattern, ...]:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise RulesError(f"{where}: expected a list of regular-expression strings")
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p, re.IGNORECASE))
        except re.error as exc:
            raise RulesError(f"{where}: bad pattern {p!r} ({exc})") from None
    return tuple(out)


def load_rules(path: str | Path | None = None) -> Rules:
    """Parse a rules TOML (default: the shipped ``default_rules.toml``)."""
    if path is None:
        text = resources.files("client.prepare").joinpath("default_rules.toml").read_text()
        source = "default_rules.toml"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise RulesError(f"{path}: cannot read ({exc.strerror})") from None
        source = str(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: not valid TOML ({exc})") from None
    seqs = doc.get("sequences", {})
    order = doc.get("order", list(seqs))
    rules = []
    for name in order:
        if name not in SEQUENCES:
            raise RulesError(f"{source}: unknown sequence {name!r} in order (known: {', '.join(SEQUENCES)})")
        if name not in seqs:
            raise RulesError(f"{source}: order names {name!r} but there is no [sequences.{name}]")
        sec = seqs[name]
        rules.append(SequenceRule(
            name=name, include=_compile(sec.get("include", []), f"{source} [sequences.{name}] include"),
            exclude=_compile(sec.get("exclude", []), f"{source} [sequences.{name}] exclude"),
            temporal=bool(sec.get("temporal", name == "dce"))))
    return Rules(order=tuple(rules), ignore=_compile(doc.get("ignore", []), f"{source} ignore"),
                 source=source)
