"""Names a module offers from another one that is imported on first use (the figure modules import
matplotlib, which a run without figures never needs)."""
import importlib

__all__ = ["lazy_attributes"]


def lazy_attributes(module_name, home, names):
    """A module-level ``__getattr__`` for ``module_name`` that returns ``names`` from module ``home``
    (imported when one of them is first read)."""
    names = frozenset(names)

    def __getattr__(name):
        if name in names:
            return getattr(importlib.import_module(home), name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    return __getattr__
