"""The state API's exception, with Ray's name."""

from zray.exceptions import RayError


class RayStateApiException(RayError):
    """A state API call failed or its answer would be missing data (see
    ``raise_on_missing_output``)."""
