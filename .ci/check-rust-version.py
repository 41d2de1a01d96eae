"""The workspace's rust-version must be the true minimum: the highest
rust-version any package in the resolved tree (all features, this
platform's targets) declares. Run from the repository's root."""

import json
import subprocess
import sys


def version(text):
    return tuple(int(part) for part in text.split("."))


host = next(line.split()[1] for line in subprocess.check_output(["rustc", "-vV"], text=True).splitlines()
            if line.startswith("host:"))
metadata = json.loads(subprocess.check_output(
    ["cargo", "metadata", "--format-version", "1", "--locked", "--all-features", "--filter-platform", host]))
members = set(metadata["workspace_members"])
resolved = {node["id"] for node in metadata["resolve"]["nodes"]}
packages = [p for p in metadata["packages"] if p["id"] in resolved]
needed = max((p for p in packages if p["id"] not in members and p.get("rust_version")),
             key=lambda p: version(p["rust_version"]))
declared = {p["name"]: p.get("rust_version") for p in packages if p["id"] in members}
wrong = {name: v for name, v in declared.items() if v is None or version(v) != version(needed["rust_version"])}
if wrong:
    sys.exit(f"rust-version {wrong} is not the true minimum {needed['rust_version']} "
             f"(needed by {needed['name']} {needed['version']})")
print(f"rust-version {needed['rust_version']}: the true minimum "
      f"({needed['name']} {needed['version']} needs it), declared by all {len(declared)} crates")
