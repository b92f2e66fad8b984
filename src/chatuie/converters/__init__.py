"""One converter per raw format; each returns unified :class:`~chatuie.records.Record` objects."""
