"""The pipeline: one query end to end, as a line of stages, with no HTTP in it.

``Pipeline.answer`` and ``Pipeline.answer_stream`` (``pipeline.py``) read top to bottom:

    plan      plan.py       the ensemble, limits, deadline, fusion settings, the answer's id
    admit     admission.py  a slot, or 429 (queueing counts against the deadline)
    fan out   gather.py     every member asked at once (``service.members.fanout``), quorum checked
    rank      choose.py     the ranker orders the ballot (or, failing, member order stays)
    vote      voting.py     a majority vote may reorder it
    fuse      fuse.py       the fusion policy, the fused text whole or in pieces, or the top candidate
    respond   respond.py    the ``Answer`` with its evidence and usage
    record    respond.py    per-member metrics, the status book, the ``answered`` log line

A failing ranker or fuser degrades the answer in one place (``failures.py``). The pipeline takes
and returns its own types (``types.py``); the serving layer converts wire models to and from them.
"""
