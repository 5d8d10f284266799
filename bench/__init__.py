"""Benchmarks of nimu_rt side by side with BullMQ, Socket.IO and bare Starlette.

Not part of the test suite: each module is one command, documented in
bench/README.md, and results go to bench/results/ (ignored by git) and, for
the runs that count, bench/RESULTS.md.
"""
