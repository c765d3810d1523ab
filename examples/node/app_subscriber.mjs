// Follow an hfl model from Node.js with nothing but the mqtt package and node:crypto, coded
// against docs/asyncapi.yaml: reassemble HFC1 chunks, verify the HFL1 envelope (Ed25519 key
// from the CA-signed roster), open the HFS1 sealed body (X25519, HKDF-SHA256, AES-256-GCM),
// read the safetensors tensors and write each version's ONNX file to the working directory.
//
//   npm ci && node app_subscriber.mjs DEVICE_DIR HOST PORT MODEL [VERSIONS]
//
// DEVICE_DIR is the app's folder from `hfl pki issue PKI ID --role app`. The versions are
// sealed for the app that requested the job (request one with the Python SDK or by hand).
// Kept short: it reads the roster file once (no live revocation) and keeps no repeat list.
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

const partial = new Map(); // HFC1 frames: "HFC1" | id (16) | u32 index | u32 count | u64 total | data
function reassemble(topic, p) {
  if (p.subarray(0, 4).toString() !== "HFC1") return p;
  const key = topic + p.subarray(4, 20).toString("hex");
  const [index, count, total] = [p.readUInt32LE(20), p.readUInt32LE(24), Number(p.readBigUInt64LE(28))];
  if (total > 64 << 20) throw new Error("too large");
  const m = partial.get(key) ?? { buf: Buffer.alloc(total), got: new Set() };
  partial.set(key, m);
  p.copy(m.buf, index * Math.ceil(total / count), 36);
  m.got.add(index);
  if (m.got.size < count) return null;
  partial.delete(key);
  return m.buf;
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
client.on("connect", () => client.subscribe(`hfl/v1/coord/models/${model}`, { qos: 1 }));
client.on("error", (e) => { console.error(`mqtt: ${e.message}`); process.exitCode = 1; client.end(); });
const newest = new Map(); // job → newest version shown: retained copies come again
client.on("message", (topic, payload) => {
  try {
    const data = payload.length ? reassemble(topic, payload) : null;
    const { header, tensors: t } = data ? open(topic, data) : {};
    if (header?.type !== "model" || !t || header.round <= (newest.get(header.job) ?? 0)) return;
    const m = header.meta;
    newest.set(m.job, m.version);
    fs.writeFileSync(`${model}-v${m.version}.onnx`, t.onnx);
    const agents = Object.entries(m.metrics.eval_metrics).map(([k, v]) => `${k} ${v.toFixed(3)}`);
    console.log(`${m.job} v${m.version}: task ${m.task}, agents' ${agents.join(", ") || "-"}, ` +
                `epsilon ${m.epsilon ?? "none"}, wrote ${model}-v${m.version}.onnx (${t.onnx.length} bytes)`);
    if (--remaining === 0) client.end();
  } catch (e) {
    console.error(`refused a message on ${topic}: ${e.message}`);
  }
});
