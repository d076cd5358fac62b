// What the nodemailer scripts share: a transport to kumoauth over STARTTLS
// (required), trusting the test CA for the name "localhost", and the
// outcome of one sendMail printed as one JSON line.
"use strict";
const fs = require("fs");
const nodemailer = require("nodemailer");

// Send *message* to 127.0.0.1:PORT with *auth*; print {ok, response[, code]}.
module.exports = function submit(port, caFile, auth, message) {
  const transport = nodemailer.createTransport({
    host: "127.0.0.1",
    port: Number(port),
    secure: false,
    requireTLS: true,
    tls: { ca: fs.readFileSync(caFile), servername: "localhost" },
    auth,
  });
  return transport
    .sendMail(message)
    .then((info) => {
      console.log(JSON.stringify({ ok: true, response: info.response, accepted: info.accepted }));
    })
    .catch((err) => {
      console.log(JSON.stringify({ ok: false, code: err.responseCode || null, response: err.response || String(err.message) }));
    })
    .finally(() => transport.close());
};
