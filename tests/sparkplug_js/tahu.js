// An independent Sparkplug B codec for the tests: Eclipse Tahu's reference JavaScript library
// (npm sparkplug-payload, its own protobufjs build of sparkplug_b.proto), not the agent's code.
// One JSON request per stdin line, one JSON answer per stdout line:
//   {"decode": "<base64 payload>", "types": {"name": 10}}
//                                    -> {"ok": true, "payload": {...}}   64-bit values as decimal strings
// DATA messages carry no datatype (the spec says they should not): like a host application, the caller
// passes the datatypes the births declared in "types", and they are put on the metrics before Tahu decodes.
//   {"encode": {...Tahu payload...}} -> {"ok": true, "base64": "..."}
"use strict";
const readline = require("readline");
const Long = require("long");
const sparkplug = require("sparkplug-payload").get("spBv1.0");
const Payload = require("sparkplug-payload/lib/sparkplugPayloadProto").org.eclipse.tahu.protobuf.Payload;

function withTypes(bytes, types) {
  if (!types) { return bytes; }
  const message = Payload.decode(bytes);
  for (const metric of message.metrics) {
    if (!metric.datatype && metric.name in types) { metric.datatype = types[metric.name]; }
  }
  return Payload.encode(message).finish();
}

function plain(value) {
  if (Long.isLong(value)) { return value.toString(); }
  if (value instanceof Uint8Array) { return Buffer.from(value).toString("base64"); }
  if (Array.isArray(value)) { return value.map(plain); }
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const [key, item] of Object.entries(value)) { out[key] = plain(item); }
    return out;
  }
  return value;
}

const lines = readline.createInterface({ input: process.stdin });
lines.on("line", (line) => {
  let answer;
  try {
    const request = JSON.parse(line);
    if ("decode" in request) {
      const bytes = withTypes(Buffer.from(request.decode, "base64"), request.types);
      answer = { ok: true, payload: plain(sparkplug.decodePayload(bytes)) };
    } else {
      answer = { ok: true, base64: Buffer.from(sparkplug.encodePayload(request.encode)).toString("base64") };
    }
  } catch (error) {
    answer = { ok: false, error: String(error && error.stack || error) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
});
