"""Errors of the quality metrics; both are ``LdprunerError``s so a build reports them like any other stage error."""

from __future__ import annotations

from ldpruner.base.errors import LdprunerError

__all__ = ["MetricInputError", "MissingMetricPackageError"]


class MetricInputError(LdprunerError, ValueError):
    """Images, features or metric settings of the wrong shape, range, count or type."""


class MissingMetricPackageError(LdprunerError, ImportError):
    """A package that ships a metric's weights or data is not installed (they come with ``ldpruner[bench]``)."""
