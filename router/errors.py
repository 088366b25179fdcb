"""Errors an engine client raises that the HTTP API turns into something other than a 500."""

from __future__ import annotations


class EngineUnavailable(RuntimeError):
    """The engine cannot take a request right now (no healthy target replica yet, or all of them gone): the API
    answers 503 with a Retry-After header, as a load balancer in front of it expects."""

    retry_after_s = 1


class TargetsBusy(EngineUnavailable):
    """Every healthy target replica refused the request because it is at capacity (`target.max_queued` waiting
    sequences on top of `max_batch` running): 503 with Retry-After, at once rather than after a timeout."""


class RequestTimeout(RuntimeError):
    """The request was still generating when the router's deadline (`router.request_timeout_s`) passed: the API
    answers 504 (in-band for a stream that already started); the target aborts the sequence, freeing its slot."""
