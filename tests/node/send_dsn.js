// Submit one message with nodemailer over STARTTLS with AUTH PLAIN, asking
// for delivery status notifications (nodemailer's `dsn` option: RET,
// ENVID, NOTIFY, ORCPT), and print the outcome as one JSON line.  Driven
// by tests/test_relay_dsn.py:
//   node send_dsn.js PORT CA_FILE USER [TO ORIGINAL_RECIPIENT]
// The password is read from standard input, never from a command line.
"use strict";
const fs = require("fs");
const submit = require("./submit");

const [port, caFile, user, to = "rcpt@example.net", original = "orig@example.net"] =
  process.argv.slice(2);
const pass = fs.readFileSync(0, "utf8").trim();

submit(port, caFile, { user, pass }, {
  from: "scott@example.com",
  to,
  subject: "nodemailer asking for DSN",
  text: "hello from nodemailer\n",
  dsn: {
    id: "nm+env=1",
    return: "headers",
    notify: ["success", "failure"],
    recipient: original,
  },
});
