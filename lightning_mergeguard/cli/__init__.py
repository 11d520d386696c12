"""The command-line programs: ``mergeguard-merge`` (:mod:`.merge`) and ``mergeguard-protect`` (:mod:`.protect`).

Both share one style (:mod:`._args`): hyphenated options with bare on/off switches (``--permute-residual``,
``--no-base-check``; the underscored spellings are accepted too), ``--help`` and argument errors answered before
torch is imported, every expected failure printed as one line naming its file or option (exit 2), Ctrl-C and
SIGTERM handled from the first line (exit 130 / 143, nothing half-written left behind).
"""
