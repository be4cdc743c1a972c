"""Settings for every test folder (tests/ and playwright/).

Property tests explore new random examples on every developer run; on CI (`CI` set, as `.ci/run` is called there)
they run derandomized, so a landing is judged on a reproducible set of examples rather than on luck. A failure
found locally is kept in `.hypothesis/` and replayed until fixed.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
