"""The HTTP gateway: Segment's tracking API (and the email pixel) translated to IngestService calls."""
