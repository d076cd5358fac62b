# The built-in credential stores as Twisted strcred plugins:
#   twistd kumoauth --config FILE --auth passwd-file:/etc/kumoauth/users
# listed by `twistd kumoauth --help-auth`.  The work lives in
# kumoauth.backends; each store module is imported only when used.
# This directory must not get an __init__.py (twisted.plugins is a
# namespace package that Twisted extends itself).
from kumoauth.backends.plugins import plugins

globals().update(plugins())
