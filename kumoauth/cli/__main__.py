from kumoauth.cli import console

console()
