"""The computations of each stage: extract, (later) cluster, evaluate and report."""
