"""Defers importing protobuf modules the agent does not run when protobuf uses upb.

protobuf's descriptor_pool imports python_message, the pure-Python message implementation, even
when its C extension (upb) does all the work; python_message in turn imports text_format, the
Python decoder and encoder, containers and with them pickle, copy and datetime. Under TCG every
module body costs: in the guest, importing the agent took 2.1 s of which agent_pb2's closure was
0.9 s. A deferred module is a stand-in that runs the real module on its first attribute access, so
with the pure-Python implementation everything still works (just later). The guest image packs
these modules as before (the image probe imports the agent without deferral).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Iterable

DEFERRED = ("google.protobuf.internal.python_message",)


def install(names: Iterable[str] = DEFERRED) -> None:
    """Stand-ins for `names` in sys.modules; a module that is imported already is left alone."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)  # imports the parent packages, which are cheap
        if spec is None or spec.loader is None:
            continue
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)  # `from parent import child` finds it too
