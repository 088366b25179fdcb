"""Worker registry: how targets and the router find draft and target replicas as they come and go.

A named Ray actor (`specray-registry` in namespace `specray`, created on first use by whichever replica starts
first) maps replica ids to gRPC addresses. Replicas register on start, heartbeat every few seconds and unregister
on shutdown; entries whose heartbeat is older than `ttl_s` are treated as gone (a replica killed with SIGKILL
never unregisters). Readers (the router) poll `list` on a background thread; nothing here is on the per-step path.
"""

from __future__ import annotations

import logging
import threading
import time

import ray

log = logging.getLogger(__name__)

REGISTRY_NAME = "specray-registry"
NAMESPACE = "specray"


@ray.remote(num_cpus=0, max_restarts=-1)
class Registry:
    def __init__(self, ttl_s: float = 10.0):
        self.ttl_s = ttl_s
        self.entries: dict[str, dict] = {}

    def register(self, app: str, kind: str, replica_id: str, address: str, meta: dict | None = None) -> None:
        self.entries[replica_id] = {"app": app, "kind": kind, "address": address, "meta": meta or {},
                                    "seen": time.time()}

    def heartbeat(self, app: str, kind: str, replica_id: str, address: str) -> None:
        if replica_id in self.entries:
            self.entries[replica_id]["seen"] = time.time()
        else:  # the registry restarted: re-learn the replica
            self.register(app, kind, replica_id, address)

    def unregister(self, replica_id: str) -> None:
        self.entries.pop(replica_id, None)

    def list(self, app: str, kind: str) -> list[str]:
        now = time.time()
        return sorted(e["address"] for e in self.entries.values()
                      if e["app"] == app and e["kind"] == kind and now - e["seen"] < self.ttl_s)


def get_registry():
    return Registry.options(name=REGISTRY_NAME, namespace=NAMESPACE, get_if_exists=True,
                            lifetime="detached").remote()


class Registration:
    """Keeps one replica registered (heartbeat thread) until `close()`."""

    def __init__(self, app: str, kind: str, replica_id: str, address: str, every_s: float = 2.0):
        self.args = (app, kind, replica_id, address)
        self.registry = get_registry()
        ray.get(self.registry.register.remote(*self.args))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(every_s,), daemon=True, name="registry-heartbeat")
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.registry.heartbeat.remote(*self.args)
            except Exception:  # the registry is restarting: the next beat re-registers
                log.debug("registry heartbeat failed", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        try:
            ray.get(self.registry.unregister.remote(self.args[2]), timeout=5)
        except Exception:
            pass


def lister(app: str, kind: str):
    """A blocking callable returning the live addresses of one pool (for TargetPoolClient)."""
    registry = get_registry()

    def _list() -> list[str]:
        return ray.get(registry.list.remote(app, kind), timeout=10)

    return _list
