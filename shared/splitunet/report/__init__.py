"""The demo's report: ``report.json`` checks and machine facts (:mod:`.summary`), figures (:mod:`.figures`) and
the self-contained ``report.html`` (:mod:`.page`)."""
