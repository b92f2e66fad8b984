"""Extraction for users: the extractor, long texts in windows, file jobs, the HTTP server."""
