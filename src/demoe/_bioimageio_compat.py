"""bioimageio.spec before 0.5.14 with pydantic-core 2.50 or later: its serializers fixed in place.

bioimageio.spec 0.5.12 (the version bioimageio.core 0.11 pins) calls pydantic's
serializer handler as ``handler(value, info)``. pydantic-core takes a second
argument only as an ``index_key`` (an int or a str) and, since 2.50 (pydantic
2.14), refuses anything else, so every description with a file in it fails to
build or to save ("'index_key' is expected to be an integer or a string, got
'SerializationInfo(...)'"). bioimageio.spec 0.5.14 calls ``handler(value)``.

:func:`fix_serializers` gives the three serializers of the older versions a body
that passes their handler on with one argument. It changes their code objects,
as pydantic's schemas hold the functions themselves; nothing happens on 0.5.14
and later, or where the functions are not found.
"""

from __future__ import annotations

from importlib.metadata import version

#: The first bioimageio.spec that calls its serializer handlers with one argument.
FIXED_IN = (0, 5, 14)


def _one_argument_handler(value, handler, info):  # pragma: no cover - runs as the patched serializers' code
    """The patched serializer: the original (kept in its module as ``_demoe_unpatched``), with a handler that drops
    the ``info`` it is given."""
    return _demoe_unpatched(value, lambda v, *_: handler(v), info)  # noqa: F821 - the patched function's module


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def fix_serializers() -> bool:
    """Patch bioimageio.spec's serializers where they call ``handler(value, info)``; True if anything was patched."""
    import types

    if _release(version("bioimageio.spec")) >= FIXED_IN:
        return False
    from bioimageio.spec._internal import io_packaging, validated_string_with_inner_node
    from bioimageio.spec.model import v0_4

    decorators = getattr(validated_string_with_inner_node.ValidatedStringWithInnerNode, "__pydantic_decorators__", None)
    inner = getattr(decorators, "model_serializers", {}).get("_serialize")
    targets = [getattr(io_packaging, "package_file_descr_serializer", None), getattr(v0_4, "package_weights", None),
               getattr(inner, "func", None)]
    patched = False
    for func in targets:
        if not isinstance(func, types.FunctionType) or func.__code__ is _one_argument_handler.__code__:
            continue
        if func.__globals__.get("_demoe_unpatched") is not None or func.__closure__:  # one per module, no closures
            continue
        func.__globals__["_demoe_unpatched"] = types.FunctionType(func.__code__, func.__globals__, func.__name__,
                                                                  func.__defaults__)
        func.__code__ = _one_argument_handler.__code__
        patched = True
    return patched
