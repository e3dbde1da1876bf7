"""The warning a deployment gets when the gateway does not know its replicas' methods.

Calls to unknown methods still work (forwarded as a bidi stream, which carries any shape),
but they cost more and, beyond the bounded set of names that keep their own label, are
counted as `method="other"`. The warning names the fix; it is logged once and shown by
`gateway status` on the deployment.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("gateway.methods")

FIX = ("add the .proto files to proto_files:, or a descriptor set to descriptor_sets: "
       "(protoc --descriptor_set_out=... --include_imports), or the generated _pb2 module to "
       "proto_modules:, or serve gRPC server reflection from the replicas")
_SHOWN_LEN = 120


def _shown(path: str) -> str:
    """A client-chosen path, safe to log and show: printable, bounded, quoted."""
    text = path[:_SHOWN_LEN] + ("..." if len(path) > _SHOWN_LEN else "")
    return repr(text)


def note_unknown_method(router: Any, path: str) -> None:
    """Remember (and log, once per deployment) the first unknown method called."""
    router.unknown_method = path
    log.warning("application %r, deployment %r: method %s is not known to the gateway: calls "
                "are forwarded without their shape (slower) and may be labelled "
                'method="other"; %s', router.application, router.deployment, _shown(path), FIX)


def note_known_method(route: Any, seen: set[str], application: str) -> None:
    """A replica answered a call to a known method: the deployment's methods are known."""
    seen.add(application)
    if route is not None:
        route.router.known_method_seen = True


def _unknown_because(has_sources: bool) -> str:
    # Sources in the config may describe other services only: they do not silence this
    # deployment's warning; a call it answers to a method the gateway knows does.
    if has_sources:
        return ("serve no gRPC reflection and no call to them has used a method the config's "
                "proto_files, descriptor_sets or proto_modules describe yet: their methods may "
                "be unknown")
    return ("serve no gRPC reflection and the config names no proto_files, descriptor_sets or "
            "proto_modules: their methods are unknown")


def no_reflection_warning(application: str, deployment: str, has_sources: bool = False) -> str:
    return (f"the replicas of application {application!r}, deployment {deployment!r} "
            f"{_unknown_because(has_sources)} to the gateway; {FIX}")


def deployment_warning(router: Any, reflection_empty: bool, has_sources: bool) -> str:
    """The WARNING `gateway status` shows on a deployment, or ""."""
    if router.unknown_method:
        return (f"calls to methods the gateway does not know (first: "
                f"{_shown(router.unknown_method)}) are forwarded without their shape (slower) "
                f'and may be labelled method="other"; {FIX}')
    if reflection_empty and not router.known_method_seen:
        return f"its replicas {_unknown_because(has_sources)}; {FIX}"
    return ""


def has_method_sources(config: Any) -> bool:
    """True when the config names method shapes of its own (beyond reflection)."""
    return bool(config.proto_modules or config.proto_files.files or config.descriptor_sets)
