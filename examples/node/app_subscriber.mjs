// Follow an hfl model from Node.js with nothing but the mqtt package and node:crypto, coded
// against docs/asyncapi.yaml: reassemble HFC1 chunks (and retained sets: HFM1 manifest on the
// model's topic, frames on its chunk subtopics), verify the HFL1 envelope (Ed25519 key
// from the CA-signed roster), open the HFS1 sealed body (X25519, HKDF-SHA256, AES-256-GCM),
// read the safetensors tensors and write each version's ONNX file to the working directory.
//
//   npm ci && node app_subscriber.mjs DEVICE_DIR HOST PORT MODEL [VERSIONS]
//
// DEVICE_DIR is the app's folder from `hfl pki issue PKI ID --role app`. The versions are
// sealed for the app that requested the job (request one with the Python SDK or by hand).
// Kept short: it reads the roster file once (no live revocation), keeps no repeat list and
// never drops the frames of a retained set that no manifest names.
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import mqtt from "mqtt";

const [dir, host, port, model, versions = "0"] = process.argv.slice(2);
let remaining = Number(versions); // stop after this many versions (0: never)
const id = path.basename(dir);
const file = (name) => fs.readFileSync(path.join(dir, name));
const rawKey = (crv, raw) =>
  crypto.createPublicKey({ key: { kty: "OKP", crv, x: raw.toString("base64url") }, format: "jwk" });

// The roster: canonical JSON (sorted keys, no spaces, non-ASCII as \uXXXX) signed by the CA.
const canonical = (v) =>
  Array.isArray(v) ? `[${v.map(canonical).join(",")}]`
  : v !== null && typeof v === "object"
    ? `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(",")}}`
    : JSON.stringify(v);
const ascii = (s) =>
  s.replace(/[\u0080-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
const signed = JSON.parse(file("roster.json"));
const caKey = new crypto.X509Certificate(file("ca.crt")).publicKey;
const rosterSignature = Buffer.from(signed.signature.value, "base64");
if (!crypto.verify("sha256", Buffer.from(ascii(canonical(signed.roster))), caKey, rosterSignature)) {
  throw new Error("roster.json is not signed by the CA");
}
const members = new Map(signed.roster.members.map((m) => [m.id, m]));
const sealKey = crypto.createPrivateKey(file(`${id}.seal.key`));
const sealPublic = Buffer.from(crypto.createPublicKey(sealKey).export({ format: "jwk" }).x, "base64url");

const partial = new Map(); // "topic id" → the frames so far of one chunked message
const named = new Map(); // topic → its newest manifest (a retained set's)
function frame(topic, p, index) { // "HFC1" | id (16) | u32 index | u32 count | u64 total | data
  const id = p.subarray(4, 20).toString("hex");
  const [i, count, total] = [p.readUInt32LE(20), p.readUInt32LE(24), Number(p.readBigUInt64LE(28))];
  if (p.subarray(0, 4).toString() !== "HFC1" || total > 64 << 20 || i >= count || (index ?? i) !== i) {
    throw new Error("bad chunk");
  }
  const m = partial.get(`${topic} ${id}`) ?? { id, count, total, buf: Buffer.alloc(total), got: new Set() };
  partial.set(`${topic} ${id}`, m);
  p.copy(m.buf, i * Math.ceil(total / count), 36);
  m.got.add(i);
  return m;
}
function ready(topic, m) { // a retained set: complete, and named by the newest manifest
  const n = named.get(topic);
  if (!m || m.got.size < m.count || n?.id !== m.id) return null;
  partial.delete(`${topic} ${m.id}`);
  const digest = crypto.createHash("sha256").update(m.buf).digest();
  if (n.count !== m.count || n.total !== m.total || !digest.equals(n.digest)) throw new Error("bad set");
  return m.buf;
}
function reassemble(topic, p) { // → [the topic it counts as received on, the whole message] or null
  const sub = /^(.+)\/chunk\/(0|[1-9][0-9]*)$/.exec(topic); // frame i of a retained set
  if (sub) return [sub[1], ready(sub[1], frame(sub[1], p, Number(sub[2])))];
  const magic = p.subarray(0, 4).toString();
  if (magic === "HFM1") { // "HFM1" | id (16) | u32 count | u64 total | SHA-256 (32)
    if (p.length !== 64) throw new Error("bad manifest");
    const id = p.subarray(4, 20).toString("hex"), old = named.get(topic);
    if (old && old.id !== id) partial.delete(`${topic} ${old.id}`); // replaced: never complete
    named.set(topic, { id, count: p.readUInt32LE(20), total: Number(p.readBigUInt64LE(24)),
                       digest: p.subarray(32, 64) });
    return [topic, ready(topic, partial.get(`${topic} ${id}`))];
  }
  if (magic !== "HFC1") return [topic, p];
  const m = frame(topic, p);
  if (m.got.size < m.count) return [topic, null];
  partial.delete(`${topic} ${m.id}`);
  return [topic, m.buf];
}

function gcm(key, nonce, sealed, aad) {
  const d = crypto.createDecipheriv("aes-256-gcm", key, nonce).setAAD(aad);
  d.setAuthTag(sealed.subarray(-16));
  return Buffer.concat([d.update(sealed.subarray(0, -16)), d.final()]);
}

function unseal(h, box) { // HFS1 | E (32) | u16 n | n × (u8 L | id | wrapped key (48)) | nonce | ct | tag
  if (box.subarray(0, 4).toString() !== "HFS1") throw new Error("not a sealed body");
  const eph = box.subarray(4, 36);
  let pos = 38, wrapped = null;
  for (let i = 0; i < box.readUInt16LE(36); i++, pos += 1 + box[pos] + 48) {
    const start = pos + 1 + box[pos];
    if (box.subarray(pos + 1, start).toString() === id) wrapped = box.subarray(start, start + 48);
  }
  if (!wrapped) return null; // sealed for another app
  const fields = ["hfl/aad/v1", h.type, h.topic, h.job, String(h.round), h.stage, h.sender, h.nonce];
  const aad = Buffer.from(fields.join("\0"));
  const shared = crypto.diffieHellman({ privateKey: sealKey, publicKey: rawKey("X25519", eph) });
  const info = Buffer.concat([Buffer.from("hfl/seal/v1"), eph, sealPublic]);
  const kek = Buffer.from(crypto.hkdfSync("sha256", shared, Buffer.alloc(0), info, 32));
  const contentKey = gcm(kek, Buffer.alloc(12), wrapped, aad);
  return gcm(contentKey, box.subarray(pos, pos + 12), box.subarray(pos + 12), aad);
}

function tensors(buf) { // safetensors: u64 N | N bytes of JSON | data
  const n = Number(buf.readBigUInt64LE(0));
  const out = {};
  for (const [name, t] of Object.entries(JSON.parse(buf.subarray(8, 8 + n).toString()))) {
    const [begin, end] = t.data_offsets ?? [];
    if (name !== "__metadata__") out[name] = buf.subarray(8 + n + begin, 8 + n + end);
  }
  return out;
}

function open(topic, data) { // HFL1 | u32 H | header (H) | body | Ed25519 signature (64)
  if (data.subarray(0, 4).toString() !== "HFL1") throw new Error("not an envelope");
  const h = data.readUInt32LE(4), end = data.length - 64;
  const header = JSON.parse(data.subarray(8, 8 + h).toString("utf8"));
  const body = data.subarray(8 + h, end), sender = members.get(header.sender);
  if (header.v !== 1 || header.topic !== topic || sender?.role !== "coordinator") {
    throw new Error("not the coordinator's, or not for this topic");
  }
  const senderKey = rawKey("Ed25519", Buffer.from(sender.ed25519, "base64"));
  const signature = data.subarray(end);
  if (!crypto.verify(null, data.subarray(0, 8 + h), senderKey, signature)) throw new Error("bad signature");
  const digest = crypto.createHash("sha256").update(body).digest("hex");
  if (body.length !== header.body_len || digest !== header.digest) throw new Error("bad digest");
  const plain = header.sealed ? unseal(header, body) : body;
  return { header, tensors: plain && tensors(plain) };
}

const client = mqtt.connect({ host, port: Number(port), protocol: "mqtts", protocolVersion: 5, clientId: id,
  ca: file("ca.crt"), cert: file(`${id}.crt`), key: file(`${id}.tls.key`) });
const topic = `hfl/v1/coord/models/${model}`;
client.on("connect", () => client.subscribe([topic, `${topic}/chunk/+`], { qos: 1 }));
client.on("error", (e) => { console.error(`mqtt: ${e.message}`); process.exitCode = 1; client.end(); });
const newest = new Map(); // job → newest version shown: retained copies come again
client.on("message", (received, payload) => {
  try {
    const [on, data] = payload.length ? reassemble(received, payload) : [received, null];
    const { header, tensors: t } = data ? open(on, data) : {};
    if (header?.type !== "model" || !t || header.round <= (newest.get(header.job) ?? 0)) return;
    const m = header.meta;
    newest.set(m.job, m.version);
    fs.writeFileSync(`${model}-v${m.version}.onnx`, t.onnx);
    const agents = Object.entries(m.metrics.eval_metrics).map(([k, v]) => `${k} ${v.toFixed(3)}`);
    console.log(`${m.job} v${m.version}: task ${m.task}, agents' ${agents.join(", ") || "-"}, ` +
                `epsilon ${m.epsilon ?? "none"}, wrote ${model}-v${m.version}.onnx (${t.onnx.length} bytes)`);
    if (--remaining === 0) client.end();
  } catch (e) {
    console.error(`refused a message on ${received}: ${e.message}`);
  }
});
