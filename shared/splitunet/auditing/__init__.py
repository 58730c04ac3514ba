"""Audits of a recorded run: select records, replay attacks, score them, report, gate."""
