"""
The wire: the ESMTP state machine (:mod:`.protocol`), command and path
parsing (:mod:`.commands`), reading DATA and the trace header
(:mod:`.data`), and what a session shares with the rest of the server
(:mod:`.runtime`).
"""
