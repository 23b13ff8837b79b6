"""The method registry: the one list of methods, and what is derived from their declarations.

A method is a ``Method`` subclass that declares everything about itself (its config section, its
warm-up, its presets, its subsets, what the report draws); ``register`` adds it. The CLI's
choices, config validation, the presets, the data sets' presets, the report's cuts and colours and
``tools/noise_table.py``'s list all come from here, so that a new method touches no other file.
"""
from __future__ import annotations

from fastncl import FastnclError

_METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    """Add a method class (usable as a decorator); a second class of the same name replaces the first."""
    import dataclasses

    from fastncl.config import Config

    from .base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name in ("", "base"):
        raise TypeError(f"register: {cls!r} is not a named Method subclass")
    reserved = {f.name for f in dataclasses.fields(Config)}
    if cls.name in reserved:  # its section would be hidden by (or overwrite) a core field
        raise ValueError(f"register: a method may not be named {cls.name!r} (a core config field: "
                         f"{', '.join(sorted(reserved))})")
    _METHODS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


ENTRY_POINTS = "fastncl.methods"  # installed packages declare their method modules under this group
_loaded = False


def _load_plugins() -> None:
    """Import the modules that installed packages declare under the ``fastncl.methods`` entry-point
    group (``[project.entry-points."fastncl.methods"] mine = "mypkg.mine"``): each registers its
    method on import, so that the ``fastncl`` command, ``eval`` and ``report`` know it."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINTS):
        try:
            entry.load()
        except Exception as e:  # a broken plug-in: one line, not a traceback from deep in the CLI
            raise FastnclError(f"method plug-in {entry.name} ({entry.value}): cannot import it ({e})") from None


def methods() -> dict[str, type]:
    """Every registered method by name, the built-in ones first, then the plug-ins."""
    import fastncl.methods  # noqa: F401  (registers the built-in methods)

    _load_plugins()
    return dict(_METHODS)


def names() -> tuple[str, ...]:
    return tuple(methods())


def get(name: str) -> type:
    known = methods()
    if name not in known:
        raise FastnclError(f"--method: must be one of {', '.join(known)}; got {name!r}")
    return known[name]


def declarations(name: str) -> type:
    """The class of method ``name``, or the base class's declarations for a method not registered
    here (a run folder of a plug-in this process has not loaded)."""
    from .base import Method

    return methods().get(name, Method)


def presets() -> dict[str, dict]:
    """Every preset: one per method under its own name (its defaults), then those each declares."""
    known = methods()
    out = {name: {"method": name} for name in known}
    for name, cls in known.items():
        out.update({preset: {"method": name, **values} for preset, values in cls.presets().items()})
    return out


def data_preset(core: dict | None, source: str) -> dict | None:
    """A data set's preset: ``core`` (the core sections') with each method's own section added."""
    own = {name: cls.data_presets[source] for name, cls in methods().items() if source in cls.data_presets}
    if core is None and not own:
        return None
    return {**(core or {}), **own}
