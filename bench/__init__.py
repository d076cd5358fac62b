"""
Side-by-side benchmark of kumoauth, aiosmtpd and stock twisted.mail.

Run ``python -m bench`` (see BENCHMARKS.md and ``python -m bench --help``).
"""
