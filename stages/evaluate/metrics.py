"""The formulas of PROTOCOL.md section 5 live in ``pipeline/metrics.py`` (the explain stage
scores its segmentations with them too); this name stays importable."""
from rep_pipeline.pipeline.metrics import *  # noqa: F401,F403
from rep_pipeline.pipeline.metrics import __all__  # noqa: F401
