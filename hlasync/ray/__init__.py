"""Sandboxes across a Ray cluster. Ray comes with the ``ray`` extra:
``python -m pip install -e '.[ray]'`` in a checkout of hlasync.

:class:`RaySupervisor` has the :class:`~hlasync.Supervisor` API; its workers
are Ray actors placed on nodes that offer the ``kvm`` resource. See
docs/cluster.md.
"""

from __future__ import annotations

from .supervisor import KVM_RESOURCE, RaySupervisor

__all__ = ["KVM_RESOURCE", "RaySupervisor"]
