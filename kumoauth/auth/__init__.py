"""
Authentication: SASL decoding (:mod:`.sasl`), mechanisms as objects
(:mod:`.mechanisms`), one attempt from credentials to outcome
(:mod:`.authenticator`), Twisted Cred credentials, checkers and realm
(:mod:`.cred`), and failed-attempt throttles (:mod:`.throttle`).
"""
