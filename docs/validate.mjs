// Parse an AsyncAPI document with the official parser (its JSON schema and semantic rules):
// one JSON line per diagnostic; exit 1 on an error or a warning (hints and notes pass).
//   node docs/validate.mjs docs/asyncapi.yaml
import fs from "node:fs";
import { Parser } from "@asyncapi/parser";

const { document, diagnostics } = await new Parser().parse(fs.readFileSync(process.argv[2], "utf8"));
for (const d of diagnostics) {
  console.log(JSON.stringify({ severity: d.severity, code: d.code, path: d.path.join("/"), message: d.message }));
}
process.exitCode = document && !diagnostics.some((d) => d.severity <= 1) ? 0 : 1;
