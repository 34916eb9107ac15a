"""The top layer: the ``rep-pipeline`` command line (``app``) and the ``run`` orchestration
over the stages (``run``)."""
