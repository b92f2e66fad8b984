"""One converter per raw format; each returns unified :class:`~chatuie.data.records.Record` objects."""
