"""The audit service (replays the aggregator's recorded traffic and attacks it to measure leakage).

Not built yet: it arrives with the attacks and transcript issues. The aggregator already hands every bundle it
receives and sends to a :class:`splitunet.recorder.Recorder` (the seam the audit will read from).
"""
