// Submit one message with nodemailer over STARTTLS, authenticating with
// an OAuth2 access token (nodemailer's XOAUTH2), and print the outcome as
// one JSON line.  Driven by tests/test_oauth_e2e.py:
//   node send_oauth.js PORT CA_FILE USER
// The token is read from standard input, so it is never on a command line.
"use strict";
const fs = require("fs");
const nodemailer = require("nodemailer");

const [port, caFile, user] = process.argv.slice(2);
const accessToken = fs.readFileSync(0, "utf8").trim();

const transport = nodemailer.createTransport({
  host: "127.0.0.1",
  port: Number(port),
  secure: false,
  requireTLS: true,
  tls: { ca: fs.readFileSync(caFile), servername: "localhost" },
  auth: { type: "OAuth2", user, accessToken },
});

transport
  .sendMail({
    from: user,
    to: "rcpt@example.net",
    subject: "nodemailer over XOAUTH2",
    text: "hello from nodemailer\n",
  })
  .then((info) => {
    console.log(JSON.stringify({ ok: true, response: info.response, accepted: info.accepted }));
  })
  .catch((err) => {
    console.log(JSON.stringify({ ok: false, code: err.responseCode || null, response: err.response || String(err.message) }));
  })
  .finally(() => transport.close());
