"""
Operations: assembling the server from a configuration (:mod:`.assembly`),
listening, signals and the top service (:mod:`.service`), ``[server]
workers`` (:mod:`.workers`), metrics, thread pools and rate-limited logging.
"""
