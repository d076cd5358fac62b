"""
Onward delivery: the durable queue (:mod:`.queue`), the SMTP client that
hands messages to the upstream MTA (:mod:`.client`), delivery status
notifications (:mod:`.dsn`) and the scheduler that ties them together
(:mod:`.scheduler`).  One configured upstream, no MX lookups: the "null
client" job, not an MTA.
"""
