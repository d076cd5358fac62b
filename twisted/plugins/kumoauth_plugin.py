# A thin twistd plugin: the real work lives in kumoauth.tap.
# This directory must not get an __init__.py (twisted.plugins is a
# namespace package that Twisted extends itself).
from twisted.application.service import ServiceMaker

kumoauth = ServiceMaker(
    "kumoauth",
    "kumoauth.tap",
    "ESMTP submission server with KumoMTA-style SMTP AUTH",
    "kumoauth",
)
