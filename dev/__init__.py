"""The embedded stack, the demo, the sample application and the alert receiver: what `dataops dev`,
`dataops demo`, the tests and the benchmarks use, and a production worker never loads. They need
the `dataops[dev]` extra (embedded PostgreSQL, a local S3 endpoint); a plain install says so in
one line instead of a traceback."""

import importlib.util

from dataops.errors import BadInput

_MISSING = [name for name in ("pgserver", "moto", "psutil") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise BadInput(f"the embedded dev stack needs {', '.join(_MISSING)}, which a plain install leaves out; "
                   "install the dev extra: pip install 'dataops[dev]'")
