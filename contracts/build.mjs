// Compiles AgentKeysAudit.sol with solc-js (npm package `solc`, the version
// .ci/run installs into .ci/tools) into AgentKeysAudit.json: the ABI, the
// creation bytecode, the runtime bytecode (what `eth_getCode` answers for
// every deployment), the compiler and its settings. `--check` compiles again
// and fails if the checked-in file differs (CI runs it).
//
//   npm install --prefix .ci/tools && node contracts/build.mjs [--check]
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, "..", ".ci", "tools", "package.json"));
const solc = require("solc");

const source = readFileSync(join(here, "AgentKeysAudit.sol"), "utf8");
const settings = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun",
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object", "evm.methodIdentifiers"] } },
};
const input = { language: "Solidity", sources: { "AgentKeysAudit.sol": { content: source } }, settings };
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
if (errors.length) {
  console.error(errors.map((e) => e.formattedMessage).join("\n"));
  process.exit(1);
}
const contract = output.contracts["AgentKeysAudit.sol"].AgentKeysAudit;
const built = {
  compiler: `solc-js ${solc.version()}`,
  settings: { optimizer: settings.optimizer, evmVersion: settings.evmVersion },
  abi: contract.abi,
  methodIdentifiers: contract.evm.methodIdentifiers,
  bytecode: "0x" + contract.evm.bytecode.object,
  deployedBytecode: "0x" + contract.evm.deployedBytecode.object,
};
const text = JSON.stringify(built, null, 2) + "\n";
const file = join(here, "AgentKeysAudit.json");
if (process.argv.includes("--check")) {
  if (readFileSync(file, "utf8") !== text) {
    console.error("contracts/AgentKeysAudit.json is not what AgentKeysAudit.sol compiles to: run node contracts/build.mjs");
    process.exit(1);
  }
  console.log("contracts/AgentKeysAudit.json matches its source");
} else {
  writeFileSync(file, text);
  console.log(`wrote ${file} (${built.compiler})`);
}
