"""Type aliases shared across modules."""

from collections.abc import Callable

# Returns the current UTC time in seconds; injected so tests can move time.
Clock = Callable[[], float]
