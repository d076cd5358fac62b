# The KumoMTA smtp_server_auth_plain example, in Python.
#
#   kumo.on('smtp_server_auth_plain', function(authz, authc, password, conn_meta)
#     local password_database = { ['scott'] = 'tiger' }
#     if password == '' then return false end
#     return password_database[authc] == password
#   end)
from kumoauth import kumo


@kumo.on("smtp_server_auth_plain")
def check(authz, authc, password, conn_meta):
    password_database = {"scott": "tiger"}
    if password == "":
        return False
    return password_database.get(authc) == password
