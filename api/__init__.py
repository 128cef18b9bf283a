"""The management API: publish and run journeys, send events, look at customers."""
