/** The checked-in generated types and schema are what the Python contracts export now. */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { PACKAGE_ROOT } from "./support/env.js";

test("src/generated matches `sessionctl schema --jsonschema` (run `npm run generate` when this fails)", async () => {
  const generator = (await import(join(PACKAGE_ROOT, "scripts", "generate-types.mjs"))) as {
    exportedSchema(): string;
    render(schema: string): Promise<Record<string, string>>;
  };
  const files = await generator.render(generator.exportedSchema());
  assert.deepEqual(Object.keys(files).sort(), ["schema.ts", "wire.ts"]);
  for (const [name, text] of Object.entries(files)) {
    const current = readFileSync(join(PACKAGE_ROOT, "src", "generated", name), "utf8");
    assert.ok(current === text, `src/generated/${name} is stale: run \`npm run generate\` in typescript/`);
  }
});

test("a changed schema makes the check fail", async () => {
  const generator = (await import(join(PACKAGE_ROOT, "scripts", "generate-types.mjs"))) as {
    exportedSchema(): string;
    render(schema: string): Promise<Record<string, string>>;
  };
  const schema = JSON.parse(generator.exportedSchema());
  schema.$defs.Linked.properties.extra_field = { type: "string" };
  const files = await generator.render(JSON.stringify(schema));
  const current = readFileSync(join(PACKAGE_ROOT, "src", "generated", "wire.ts"), "utf8");
  assert.notEqual(files["wire.ts"], current);
  assert.match(files["wire.ts"]!, /extra_field\?: string/);
});
