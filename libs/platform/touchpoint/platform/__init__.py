"""The one way to build a Touchpoint service: settings, database, server bootstrap, errors,
logging, the event-log consumer and test helpers."""
