"""
kumoauth: an ESMTP submission server on Twisted with KumoMTA-style SMTP AUTH.

Policy files use ``from kumoauth import kumo``.
"""

from kumoauth import moved
from kumoauth.policy import Reject, kumo

__version__ = "0.2.0"

moved.install()

__all__ = ["Reject", "__version__", "kumo"]
