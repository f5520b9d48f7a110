"""How every Prefect task of ours retries: one policy, so a fault is treated the same in each step.

Only transient faults (a dropped connection, an S3 5xx, a lock timeout: `dataops.errors.is_transient`)
are retried, with exponential backoff and jitter so that workers that failed together do not
come back together; bad input and failed checks fail at once. Nothing is cached: every step
reads or writes a live database.
"""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from dataops.errors import retry_if_transient

RETRY_TRANSIENT = dict(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                       retry_jitter_factor=0.5, retry_condition_fn=retry_if_transient)

# A step that must not run twice on its own (it holds live objects, or its caller decides).
RUN_ONCE = dict(cache_policy=NO_CACHE)
