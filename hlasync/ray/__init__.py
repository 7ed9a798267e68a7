"""Sandboxes across a Ray cluster: ``pip install 'hlasync[ray]'``.

:class:`RaySupervisor` has the :class:`~hlasync.Supervisor` API; its workers
are Ray actors placed on nodes that offer the ``kvm`` resource. See
docs/cluster.md.
"""

from __future__ import annotations

from .supervisor import KVM_RESOURCE, RaySupervisor

__all__ = ["KVM_RESOURCE", "RaySupervisor"]
