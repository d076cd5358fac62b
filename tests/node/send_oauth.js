// Submit one message with nodemailer over STARTTLS, authenticating with
// an OAuth2 access token (nodemailer's XOAUTH2), and print the outcome as
// one JSON line.  Driven by tests/test_oauth_e2e.py:
//   node send_oauth.js PORT CA_FILE USER
// The token is read from standard input, so it is never on a command line.
"use strict";
const fs = require("fs");
const submit = require("./submit");

const [port, caFile, user] = process.argv.slice(2);
const accessToken = fs.readFileSync(0, "utf8").trim();

submit(port, caFile, { type: "OAuth2", user, accessToken }, {
  from: user,
  to: "rcpt@example.net",
  subject: "nodemailer over XOAUTH2",
  text: "hello from nodemailer\n",
});
