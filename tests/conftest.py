"""Settings shared by the unit tests."""

import os

from hypothesis import settings

# CI runs a fixed set of examples (Hypothesis's built-in "ci" profile: derandomized, no example
# database) so that a landing is not failed by a bug the random search happens to meet that day;
# locally the search stays random, and docs/compiler.md says how to hunt with many more examples.
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
