"""The analysis room's exception: one class, raised with a one-line message for bad inputs."""


class AnalysisError(ValueError):
    """An analysis was asked something impossible: arrays of the wrong shape, covariates
    outside their scaled range, a count too small to estimate from, a singular system."""
