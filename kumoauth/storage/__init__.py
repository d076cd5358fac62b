"""
Storage: the session's delivery avatar and the message (:mod:`.delivery`)
and the durable spool (:mod:`.spool`).
"""
