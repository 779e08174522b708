"""A griffe extension for syncdeco's API reference (mkdocs.yml loads it).

syncdeco's docstrings are prose with reStructuredText markup: ````name````
for code and ``:func:`name``` / ``:class:`name``` for references.  Markdown
renders the first as code but would print the roles as they are, so this
extension turns a role, and a ````Name```` that is a public class or
constant (capitalised), into a
mkdocstrings cross-reference (``[`name`][syncdeco.name]``): a link to that
name's entry in the API reference.  A role naming anything else becomes
plain code.

It also warns about every public name (``syncdeco.__all__`` and
``syncdeco.testing.__all__``) that has no docstring, so that
``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

logger = griffe.get_logger("griffe_syncdeco")

_ROLE = re.compile(r":(?:func|class|meth|exc|data|attr|mod|obj):`~?([\w.]+)`")
# Only capitalised names: a lowercase one (``rank``, ``init``) is as often a
# parameter or an attribute as the function of that name.
_LITERAL = re.compile(r"``([A-Z][\w.]*)``")
_PUBLIC_MODULES = ("syncdeco", "syncdeco.testing")


class SyncdecoDocs(griffe.Extension):
    def __init__(self) -> None:
        super().__init__()
        self._targets: dict[str, str] = {}

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "syncdeco":
            return
        modules = {"syncdeco": pkg, "syncdeco.testing": pkg["testing"]}
        for path in _PUBLIC_MODULES:
            for name in modules[path].exports or ():
                self._targets.setdefault(str(name), f"{path}.{name}")
        for path in _PUBLIC_MODULES:
            module = modules[path]
            for name in module.exports or ():
                member = module[str(name)]
                if not _docstring(member):
                    logger.warning(f"{path}.{name} has no docstring for the API reference")
        self._rewrite(pkg, seen=set())

    def _rewrite(self, obj: griffe.Object | griffe.Alias, seen: set[str]) -> None:
        if obj.is_alias:
            return  # the target is rewritten where it is defined
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._linked(obj.docstring.value)
        for member in obj.members.values():
            self._rewrite(member, seen)

    def _linked(self, text: str) -> str:
        def role(match: re.Match[str]) -> str:
            name = match[1]
            target = self._targets.get(name)
            return f"[`{name}`][{target}]" if target else f"`{name}`"

        def literal(match: re.Match[str]) -> str:
            target = self._targets.get(match[1])
            if target is None:
                return match[0]
            return f"[`{match[1]}`][{target}]"

        return _LITERAL.sub(literal, _ROLE.sub(role, text))


def _docstring(obj: griffe.Object | griffe.Alias) -> str:
    try:
        docstring = obj.docstring
    except griffe.AliasResolutionError:
        return ""
    return docstring.value.strip() if docstring is not None else ""
