"""Changing megatron-core 0.16.1 from outside site-packages, loudly: the helpers both patch sets use.

``megatron_cpu`` (the CUDA assumptions, redirected on a CPU-only machine) and ``adam_fallback`` (the
torch-Adam fallback of the distributed optimizer, on any machine without TE/apex) rewrite megatron code
with these; ``platform.distributed.init_distributed`` applies both sets by name.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
from typing import Any

MEGATRON_CORE_VERSION = "0.16.1"


def check_megatron_version() -> None:
    from megatron.core import package_info

    if package_info.__version__ != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"c2f-megatron's platform layer is written for megatron-core=={MEGATRON_CORE_VERSION}, "
            f"found {package_info.__version__}; install the pinned version"
        )


def rewrite_function(owner: Any, name: str, replacements: dict[str, str]) -> None:
    """Recompile ``owner.name`` from its own source with exact string replacements.

    Each replacement must occur in the source; otherwise the installed megatron is not the one this
    module was written for and we raise instead of running unpatched code.
    """
    raw = inspect.getattr_static(owner, name)
    is_static = isinstance(raw, staticmethod)
    is_class = isinstance(raw, classmethod)
    func = raw.__func__ if (is_static or is_class) else raw
    source = textwrap.dedent(inspect.getsource(func))
    for old, new in replacements.items():
        if old not in source:
            raise RuntimeError(
                f"c2f_megatron.platform.patching: expected text {old!r} not found in "
                f"{func.__module__}.{func.__qualname__}; megatron-core {MEGATRON_CORE_VERSION} is required"
            )
        source = source.replace(old, new)
    # Decorators (@staticmethod, @classmethod) are re-applied below, not executed from the source.
    lines = source.splitlines()
    while lines and lines[0].lstrip().startswith("@"):
        lines.pop(0)
    source = "\n".join(lines) + "\n"
    module = importlib.import_module(func.__module__)
    # Compiled inside a factory that binds ``__class__``, so zero-argument ``super()`` keeps working.
    factory_src = "def _c2f_factory(__class__):\n" + textwrap.indent(source, "    ")
    factory_src += f"    return {func.__name__}\n"
    namespace: dict[str, Any] = {}
    code = compile(
        factory_src, filename=f"<c2f rewrite of {func.__module__}.{func.__qualname__}>", mode="exec"
    )
    exec(code, module.__dict__, namespace)  # noqa: S102 - megatron's own source, rewritten as asserted above
    new_func = namespace["_c2f_factory"](owner if isinstance(owner, type) else None)
    new_func.__qualname__ = func.__qualname__
    new_func.__c2f_rewritten__ = True
    if is_static:
        new_func = staticmethod(new_func)
    elif is_class:
        new_func = classmethod(new_func)
    setattr(owner, name, new_func)
