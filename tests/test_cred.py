"""
Twisted Cred pieces of SPEC §5: credentials, checkers, realm.
"""

from __future__ import annotations

import pytest
from twisted.cred import error
from twisted.cred.checkers import FilePasswordDB, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer, task

from kumoauth.auth import checkers
from kumoauth.auth.cred import (
    AuthContext,
    IPlainCredentials,
    PlainCredentials,
    PolicyChecker,
    SubmissionRealm,
    make_portal,
)
from kumoauth.meta import ConnMeta
from kumoauth.storage.delivery import IMessageDelivery


def result_of(d: defer.Deferred):
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


def test_credentials_provide_both_interfaces():
    c = PlainCredentials("", "scott", "tiger", ConnMeta())
    assert IPlainCredentials.providedBy(c) and IUsernamePassword.providedBy(c)
    assert (c.authz, c.authc, c.username, c.password) == ("scott", "scott", b"scott", b"tiger")
    assert c.checkPassword(b"tiger") and c.checkPassword("tiger") and not c.checkPassword(b"tige")


def test_policy_checker_returns_authc():
    checker = PolicyChecker(lambda a, c, p, m: p == "tiger", 1.0, task.Clock())
    assert (
        result_of(checker.requestAvatarId(PlainCredentials("", "scott", "tiger", ConnMeta())))
        == "scott"
    )
    failed = result_of(checker.requestAvatarId(PlainCredentials("", "scott", "lion", ConnMeta())))
    assert failed.check(error.UnauthorizedLogin)


@pytest.mark.parametrize("value", [1, 0, "True", None, [True]])
def test_policy_checker_accepts_only_bool(value):
    checker = PolicyChecker(lambda a, c, p, m: value, 1.0, task.Clock())
    failed = result_of(checker.requestAvatarId(PlainCredentials("", "scott", "tiger", ConnMeta())))
    assert not failed.check(error.UnauthorizedLogin)
    assert "not bool" in failed.getErrorMessage()


def test_policy_checker_timeout():
    clock = task.Clock()
    checker = PolicyChecker(lambda a, c, p, m: defer.Deferred(), 3.0, clock)
    d = checker.requestAvatarId(PlainCredentials("", "scott", "tiger", ConnMeta()))
    clock.advance(3)
    assert result_of(d).check(defer.TimeoutError)


def test_file_password_db_through_the_portal(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("scott:tiger\n")
    portal = make_portal([FilePasswordDB(str(path))])
    meta = ConnMeta()
    ok = result_of(
        portal.login(
            PlainCredentials("", "scott", "tiger", meta),
            AuthContext("scott", meta),
            IMessageDelivery,
        )
    )
    iface, avatar, logout = ok
    assert iface is IMessageDelivery
    assert (avatar.authn_id, avatar.authz_id) == ("scott", "scott")
    assert meta.get_meta("authn_id") == "scott"
    proxied = result_of(
        portal.login(
            PlainCredentials("sales", "scott", "tiger", ConnMeta()),
            AuthContext("sales", meta),
            IMessageDelivery,
        )
    )
    assert proxied.check(error.UnauthorizedLogin)


def test_strcred_memory_checker_is_normalized():
    db = InMemoryUsernamePasswordDatabaseDontUse()
    db.addUser("carol", "s3cret")  # strcred's memory: stores str
    portal = make_portal([db])
    meta = ConnMeta()
    ok = result_of(
        portal.login(
            PlainCredentials("", "carol", "s3cret", meta),
            AuthContext("carol", meta),
            IMessageDelivery,
        )
    )
    assert ok[1].authn_id == "carol"


def test_realm_only_gives_message_delivery():
    with pytest.raises(NotImplementedError):
        SubmissionRealm().requestAvatar(
            "scott", AuthContext("scott", ConnMeta()), IUsernamePassword
        )


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nocolon", "is not"),
        ("no_such_module_x:f", "cannot import"),
        ("kumoauth.auth.cred:nothing_here", "has no callable"),
        ("kumoauth.meta:ConnMeta", "did not return an ICredentialsChecker"),
    ],
)
def test_load_checker_factory_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        checkers.build(checkers.resolve(spec, {}), reactor=None, pool=None)
