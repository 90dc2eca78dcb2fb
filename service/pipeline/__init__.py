"""The pipeline: one request end to end, with no HTTP in it.

``Pipeline.answer`` and ``Pipeline.answer_stream`` look up the ensemble, fix the deadline, take an
admission slot, fan out to the members (``service.members.fanout``), rank the candidates, fuse the
best (``service.models``), and build the response; the tracking of each request (in flight, status,
latency) starts and ends here.
"""
